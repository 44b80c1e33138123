"""Numerical composition of events with the PRV accountant (prv-accountant 0.2.0).

Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy" (NeurIPS 2021,
arXiv 2106.02848): discretise each mechanism's privacy random variable on a grid of
mesh ``eps_error / sqrt(N/2 * log(12/delta_error))`` (Thm. 5.5), compose by FFT, and
read epsilon off the composed distribution. The result is a bracket
``lower <= true epsilon <= upper`` with ``upper - lower ~ 2 * eps_error``; we report and
plan with ``upper``.

Choices made here:

- ``delta_error = delta / 1000``.
- Default ``eps_error``: ``max(0.02, 0.01 * eps_rdp)`` where ``eps_rdp`` is the (cheap,
  looser) RDP bound of the same events, so ``upper`` is within about 1.4 % of the
  true epsilon (or 0.02 absolute) at a cost that does not grow with epsilon.
- The grid is nudged to an FFT-friendly size by shrinking ``eps_error`` slightly (never
  growing it) and handing the library its own safe domain size (``eps_max``);
  prv-accountant's long-double FFT is up to 20x slower on sizes with large prime factors.
- Fixed-size (without replacement) events are accounted through the conservative
  reduction of :func:`accounting.events.dominating_event`.
- Events of the Skellam mechanism (distributed DP with secure aggregation) have no PRV
  here: a composition holding any is bounded by RDP instead
  (:func:`accounting.skellam.composed_epsilon`, Gaussian events included), returned as
  ``(0, bound, bound)``. The bracket's upper end stays an upper bound.
- If the library fails numerically (it raises for some extreme parameters), we log a
  warning and return the RDP bound as ``estimate`` and ``upper`` with ``lower = 0``.

prv-accountant is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from accounting import rdp
from accounting.errors import AccountingInputError
from accounting.events import Event, PoissonSkellamEvent, mechanism_counts, privacy_unit

log = logging.getLogger(__name__)

DELTA_ERROR_FRACTION = 1e-3
MIN_EPS_ERROR = 0.02
RELATIVE_EPS_ERROR = 0.01


@dataclass(frozen=True)
class EpsilonBound:
    """A numerical bracket on epsilon: ``lower <= true epsilon <= upper``; report ``upper``."""

    lower: float
    estimate: float
    upper: float
    # which accountant produced it: "prv", or "rdp" when the PRV library failed or the events have no PRV (Skellam)
    source: str = field(default="prv", compare=False)

    def __post_init__(self) -> None:
        for name in ("lower", "estimate", "upper"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise AccountingInputError(f"EpsilonBound.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not (self.lower <= self.estimate <= self.upper):
            raise AccountingInputError(
                f"EpsilonBound must satisfy lower <= estimate <= upper, got "
                f"({self.lower!r}, {self.estimate!r}, {self.upper!r})"
            )


ZERO = EpsilonBound(0.0, 0.0, 0.0)


def default_eps_error(epsilon_hint: float) -> float:
    """The eps_error used when none is given: ``max(0.02, 0.01 * epsilon_hint)``."""
    return max(MIN_EPS_ERROR, RELATIVE_EPS_ERROR * float(epsilon_hint))


def _check_eps_error(eps_error: object) -> float | None:
    if eps_error is None:
        return None
    if isinstance(eps_error, bool) or not isinstance(eps_error, (int, float)):
        raise AccountingInputError(f"eps_error must be a number > 0, got {eps_error!r}")
    eps_error = float(eps_error)
    if not (math.isfinite(eps_error) and eps_error > 0):
        raise AccountingInputError(f"eps_error must be finite and > 0, got {eps_error!r}")
    return eps_error


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


@functools.lru_cache(maxsize=1)
def _poisson_prv_class():
    """prv-accountant's Poisson-subsampled Gaussian PRV, with cell masses from one CDF pass.

    The library's discretiser asks for the mass of every cell [t - dt/2, t + dt/2] as
    cdf(right) - cdf(left), evaluating the (long double) CDF twice on the same edges.
    Differencing one evaluation on the shared edges gives the same masses (they telescope
    exactly to the total) at half the cost. Anything but contiguous cells goes to the
    library unchanged.
    """
    import numpy as np
    import prv_accountant as pa

    class PoissonGaussianPRV(pa.PoissonSubsampledGaussianMechanism):
        def probability(self, a, b):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim == 1 and a.shape == b.shape and a.size > 1:
                width = b[0] - a[0]
                if width > 0 and np.allclose(a[1:], b[:-1], rtol=0.0, atol=float(width) * 1e-9):
                    return np.diff(self.cdf(np.concatenate([a[:1], b])))
            return super().probability(a, b)

    return PoissonGaussianPRV


def _accountant(mechanisms: tuple[tuple[float, float, int], ...], *, eps_error: float, delta_error: float):
    """Build a PRVAccountant for ``(sigma, rate, max_count)`` triples; return it and its eps_error."""
    import prv_accountant as pa

    poisson = _poisson_prv_class()
    prvs = [
        pa.GaussianMechanism(noise_multiplier=sigma)
        if rate >= 1.0
        else poisson(sampling_probability=rate, noise_multiplier=sigma)
        for sigma, rate, _ in mechanisms
    ]
    max_counts = [count for _, _, count in mechanisms]
    try:
        from prv_accountant.accountant import compute_safe_domain_size
    except ImportError:  # pragma: no cover - a different library layout: skip the speed-up
        return pa.PRVAccountant(prvs=prvs, eps_error=eps_error, delta_error=delta_error,
                                max_self_compositions=max_counts), eps_error
    # The library's own safe domain [-L, L] (Gopi et al. 2021, Remark 5.6).
    half_width = float(compute_safe_domain_size(prvs, max_counts, eps_error=eps_error, delta_error=delta_error))
    # Mesh of Thm. 5.5: dt = eps_error / scale. An aligned domain of half-width L has
    # 2 * ceil(L / dt) + 2 points; pick the next 7-smooth size and the mesh that gives it.
    scale = math.sqrt(sum(max_counts) / 2.0 * math.log(12.0 / delta_error))
    k = math.ceil(half_width * scale / eps_error + 0.5)
    while not _is_smooth(k + 1):
        k += 1
    smooth_eps_error = half_width / (k - 0.5) * scale
    if not smooth_eps_error <= eps_error:  # pragma: no cover - guards the arithmetic above
        smooth_eps_error = eps_error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns whenever eps_max is given
        accountant = pa.PRVAccountant(
            prvs=prvs,
            eps_error=smooth_eps_error,
            delta_error=delta_error,
            max_self_compositions=max_counts,
            eps_max=half_width,
        )
    return accountant, smooth_eps_error


@functools.lru_cache(maxsize=128)
def _compose(
    mechanisms: tuple[tuple[float, float, int], ...],
    count_sets: tuple[tuple[int, ...], ...],
    delta: float,
    eps_error: float,
) -> tuple[tuple[EpsilonBound, ...], float]:
    """PRV brackets for each count set (counts <= the max counts in ``mechanisms``).

    Returns the bounds and the eps_error actually used. Raises ArithmeticError-like
    exceptions of the library unchanged; callers fall back to RDP.
    """
    accountant, used_eps_error = _accountant(
        mechanisms, eps_error=eps_error, delta_error=DELTA_ERROR_FRACTION * delta
    )
    bounds = []
    for counts in count_sets:
        lower, estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=list(counts))
        if not all(math.isfinite(v) for v in (lower, estimate, upper)):
            raise FloatingPointError(f"PRV accountant returned non-finite epsilon {(lower, estimate, upper)}")
        estimate = max(float(estimate), 0.0)
        bounds.append(EpsilonBound(lower=min(max(float(lower), 0.0), estimate), estimate=estimate,
                                   upper=max(float(upper), estimate)))
    return tuple(bounds), used_eps_error


def _rdp_fallback(events: list[Event], delta: float, exc: Exception) -> EpsilonBound:
    value = rdp.epsilon(events, delta=delta)
    log.warning("PRV accountant failed (%s: %s); reporting the RDP bound %.4g instead", type(exc).__name__, exc, value)
    return EpsilonBound(lower=0.0, estimate=value, upper=value, source="rdp")


def _validate(events: Sequence[Event], delta: float, eps_error: object) -> tuple[list[Event], float, float | None]:
    delta = rdp.check_delta(delta)
    eps_error = _check_eps_error(eps_error)
    if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
        raise AccountingInputError(f"events must be a sequence of events, got {type(events).__name__}")
    events = list(events)
    privacy_unit(events)  # checks types and that one unit is used
    return events, delta, eps_error


def epsilon(events: Sequence[Event], *, delta: float, eps_error: float | None = None) -> EpsilonBound:
    """PRV bracket on epsilon at ``delta`` for the composition of ``events`` (one privacy unit).

    Identical mechanisms are merged into one self-composition. ``eps_error=None`` picks
    :func:`default_eps_error` of the RDP bound. An empty list gives ``EpsilonBound(0, 0, 0)``.
    """
    events, delta, eps_error = _validate(events, delta, eps_error)
    if not events:
        return ZERO
    result, _ = _epsilon_with_error(events, delta=delta, eps_error=eps_error)
    return result


def _epsilon_with_error(events: list[Event], *, delta: float, eps_error: float | None) -> tuple[EpsilonBound, float]:
    """Like :func:`epsilon` (validated inputs, non-empty) but also return the eps_error used."""
    if any(isinstance(e, PoissonSkellamEvent) for e in events):  # no PRV for it: the RDP bound, eps_error 0
        from accounting.skellam import composed_epsilon  # scipy only; prv stays cheap to import

        value = composed_epsilon(events, delta=delta)
        return EpsilonBound(lower=0.0, estimate=value, upper=value, source="rdp"), 0.0
    if eps_error is None:
        eps_error = default_eps_error(rdp.epsilon(events, delta=delta))
    mechanisms = tuple(mechanism_counts(events))
    counts = tuple(count for _, _, count in mechanisms)
    try:
        bounds, used = _compose(mechanisms, (counts,), delta, eps_error)
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        return _rdp_fallback(events, delta, exc), 0.0
    return bounds[0], used


def epsilon_over_rounds(
    round_events: Sequence[Event],
    *,
    rounds: Sequence[int],
    delta: float,
    fixed_events: Sequence[Event] = (),
    eps_error: float | None = None,
) -> list[EpsilonBound]:
    """PRV brackets after each number of rounds in ``rounds``, with one accountant.

    After R rounds the composition is ``round_events`` repeated R times plus
    ``fixed_events`` once. ``eps_error=None`` uses the default for the largest R (so
    every bracket is at least that tight).
    """
    round_events, delta, eps_error = _validate(round_events, delta, eps_error)
    fixed_events, _, _ = _validate(fixed_events, delta, None)
    privacy_unit(round_events + fixed_events)
    rounds = [_check_rounds(r) for r in rounds]
    if not rounds:
        return []
    if not round_events:
        return [epsilon(fixed_events, delta=delta, eps_error=eps_error)] * len(rounds)
    r_max = max(rounds)

    def composition(r: int) -> list[Event]:
        return [_scaled(event, r) for event in round_events] + fixed_events

    if eps_error is None:
        eps_error = default_eps_error(rdp.epsilon(composition(r_max), delta=delta))
    per_round = dict(((s, q), c) for s, q, c in mechanism_counts(round_events))
    fixed = dict(((s, q), c) for s, q, c in mechanism_counts(fixed_events))
    keys = sorted(set(per_round) | set(fixed))
    mechanisms = tuple((s, q, per_round.get((s, q), 0) * r_max + fixed.get((s, q), 0)) for s, q in keys)
    count_sets = tuple(tuple(per_round.get(k, 0) * r + fixed.get(k, 0) for k in keys) for r in rounds)
    try:
        bounds, _ = _compose(mechanisms, count_sets, delta, eps_error)
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        return [_rdp_fallback(composition(r), delta, exc) for r in rounds]
    return list(bounds)


def _check_rounds(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AccountingInputError(f"rounds must be integers >= 1, got {value!r}")
    return value


def _scaled(event: Event, factor: int) -> Event:
    """``event`` with its count multiplied by ``factor``."""
    from dataclasses import replace

    return replace(event, count=event.count * factor)
