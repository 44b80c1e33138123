"""Planning: calibrate the noise multiplier or the number of rounds for a target epsilon.

Planning never touches a ledger: every evaluation uses a fresh accountant
(:mod:`accounting.prv` or :mod:`accounting.rdp`) on hypothetical events.

How :func:`calibrate_noise` stays fast with the PRV accountant (one tight PRV
evaluation costs ~0.5 s at 1e5 steps on a 2-core machine):

1. RDP (cheap, an upper bound on the true epsilon) gives a continuous starting sigma
   and the local slope of log epsilon against log sigma.
2. A coarse PRV model locates the root: ``upper`` computed with a coarse ``eps_error``,
   minus that eps_error, plus the default (tight) one predicts the tight ``upper`` to
   within the discretisation error of the estimate (~1e-3). Secant steps in log-log
   space take 2-3 coarse evaluations.
3. The answer lives on a grid of 3 significant digits. The tight bound is evaluated at
   the grid point above the root; the offset between tight and predicted values there
   re-aims the search once if needed, and the grid point below is evaluated tightly
   only when the corrected prediction puts it within a small margin of the target.

The returned sigma always has a tight ``upper <= target`` (checked by a tight
evaluation, the same one :func:`accounting.prv.epsilon` gives with its default
precision); the grid point below is either tightly checked or predicted clearly above.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from accounting import prv, rdp
from accounting.errors import AccountingInputError
from accounting.events import Event, PoissonGaussianEvent, privacy_unit
from accounting.prv import EpsilonBound

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
# Largest epsilon we plan and train for. Measured (delta 1e-5 and 1e-9, q in [1e-3, 1], up to 1e4
# steps; README "Command line"): up to 100, calibration takes seconds and the PRV bracket stays
# within 3 % of its upper bound (or, where prv-accountant refuses the parameters, the RDP bound
# is reported); above it the bracket widens (lower 40 % below upper at 1000), the library
# overflows, and at 1e9 one calibration takes minutes. e^100 rules nothing out in any case.
MAX_EPSILON = 100.0
MAX_NOISE_MULTIPLIER = 1e6
DEFAULT_ROUNDS_LIMIT = 1_000_000
_SIG_DIGITS = 3
_GRID_PER_DECADE = 900  # mantissas 100..999


# -- validation -----------------------------------------------------------------------
def epsilon_range_problem(value: float) -> str | None:
    """Why a finite epsilon > 0 is outside the range we plan for (``None`` when it is inside)."""
    if value > MAX_EPSILON:
        return (f"must be <= {MAX_EPSILON:g} (the range where the accountants are fast and tight; "
                f"e^{MAX_EPSILON:g} rules nothing out anyway)")
    return None


def check_epsilon(value: object, *, name: str = "target_epsilon") -> float:
    """Validate a finite epsilon in (0, MAX_EPSILON]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingInputError(f"{name} must be a finite number > 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise AccountingInputError(f"{name} must be finite and > 0, got {value!r}")
    problem = epsilon_range_problem(value)
    if problem is not None:
        raise AccountingInputError(f"{name} {problem}, got {value!r}")
    return value


def check_accountant(value: object) -> str:
    if value not in ACCOUNTANTS:
        raise AccountingInputError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise AccountingInputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_workloads(workloads: object, unit: str) -> list[tuple[float, int]]:
    if isinstance(workloads, (str, bytes)) or not isinstance(workloads, Sequence) or not workloads:
        raise AccountingInputError(f"workloads must be a non-empty sequence of (sample_rate, steps), got {workloads!r}")
    checked = []
    for item in workloads:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise AccountingInputError(f"each workload must be a (sample_rate, steps) pair, got {item!r}")
        event = PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=item[0], count=item[1], unit=unit)
        checked.append((event.sample_rate, event.count))
    return checked


def _check_fixed(fixed_events: object, unit: str) -> list[Event]:
    if isinstance(fixed_events, (str, bytes)) or not isinstance(fixed_events, Sequence):
        raise AccountingInputError(f"fixed_events must be a sequence of events, got {type(fixed_events).__name__}")
    fixed = list(fixed_events)
    found = privacy_unit(fixed)
    if found is not None and found != unit:
        raise AccountingInputError(f"fixed_events must have unit {unit!r} like the planned steps, got {found!r}")
    return fixed


def pareto_workloads(workloads: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    """Drop workloads dominated by another (sample rate and steps both <= another's).

    Epsilon grows with the sample rate (the hockey-stick divergence is convex in the
    mixture weight) and with the number of steps, so a dominated workload never spends more.
    """
    unique = sorted(set(workloads), key=lambda w: (-w[0], -w[1]))
    kept: list[tuple[float, int]] = []
    for q, steps in unique:
        if not any(q <= q2 and steps <= t2 for q2, t2 in kept):
            kept.append((q, steps))
    return kept


# -- the 3-significant-digit grid ------------------------------------------------------
def round_up_sig(x: float, digits: int = _SIG_DIGITS) -> float:
    """Round ``x > 0`` up to ``digits`` significant digits (0.74812 -> 0.749)."""
    return _grid_value(_grid_index_up(x, digits), digits)


def _grid_index_up(x: float, digits: int = _SIG_DIGITS) -> int:
    low = 10 ** (digits - 1)
    exponent = math.floor(math.log10(x)) - (digits - 1)
    mantissa = round(x / 10.0**exponent, 6)
    if mantissa >= 10 * low:
        exponent, mantissa = exponent + 1, round(x / 10.0**(exponent + 1), 6)
    elif mantissa < low:
        exponent, mantissa = exponent - 1, round(x / 10.0**(exponent - 1), 6)
    return exponent * (9 * low) + (math.ceil(mantissa) - low)


def _grid_value(index: int, digits: int = _SIG_DIGITS) -> float:
    low = 10 ** (digits - 1)
    exponent, offset = divmod(index, 9 * low)
    return float(f"{offset + low}e{exponent}")


# -- evaluation -------------------------------------------------------------------------
def bound(events: Sequence[Event], *, delta: float, accountant: str = "prv") -> EpsilonBound:
    """Epsilon bracket with the chosen accountant (RDP: ``lower = 0``, ``estimate = upper``)."""
    return bound_and_source(events, delta=delta, accountant=accountant)[0]


def bound_and_source(events: Sequence[Event], *, delta: float, accountant: str = "prv") -> tuple[EpsilonBound, str]:
    """:func:`bound` and the accountant that produced it: ``"prv"``, or ``"rdp"`` (asked for, or PRV's fallback).

    prv-accountant refuses some parameters (e.g. q ~ 0.1-0.5 with epsilon above ~6: "Discrete mean
    differs from continuous mean"); :mod:`accounting.prv` then returns the RDP bound, and this says so.
    """
    accountant = check_accountant(accountant)
    if accountant == "prv":
        checked, delta, _ = prv._validate(events, delta, None)
        if not checked:
            return prv.ZERO, "prv"
        result, used = prv._epsilon_with_error(checked, delta=delta, eps_error=None)  # used == 0: RDP fallback
        return result, ("prv" if used > 0.0 else "rdp")
    value = rdp.epsilon(events, delta=delta)
    return EpsilonBound(lower=0.0, estimate=value, upper=value, source="rdp"), "rdp"


class _RdpCurve:
    """RDP epsilon of ``count`` Poisson-Gaussian steps plus fixed events, cheap to re-evaluate."""

    def __init__(self, *, sample_rate: float, delta: float, fixed: Sequence[Event]) -> None:
        self.sample_rate = sample_rate
        self.delta = delta
        self.fixed_curve = rdp.rdp_curve(fixed)
        self._step_curves: dict[float, np.ndarray] = {}

    def step_curve(self, sigma: float) -> np.ndarray:
        if sigma not in self._step_curves:
            self._step_curves[sigma] = rdp.rdp_poisson_gaussian(noise_multiplier=sigma, sample_rate=self.sample_rate)
        return self._step_curves[sigma]

    def epsilon(self, sigma: float, steps: int) -> float:
        curve = steps * self.step_curve(sigma) + self.fixed_curve
        return rdp.epsilon_from_rdp(orders=rdp.DEFAULT_ORDERS, rdp=curve, delta=self.delta)[0]


def _root_log_log(f: Callable[[float], float], target: float, x0: float, slope: float, *,
                  rel_tol: float, x_tol: float = 0.0, max_evals: int = 40) -> tuple[float, list[tuple[float, float]]]:
    """Approximate root of ``f(x) = target`` for a decreasing ``f > 0``; returns it and all evaluations.

    Secant steps on (log x, log f(x)), where epsilon-versus-sigma curves are nearly
    straight; the first step uses ``slope`` (d log f / d log x), extrapolation is
    limited, and once the root is bracketed the Illinois rule keeps it there. Stops
    when ``|log(f / target)| < rel_tol`` or, without evaluating it, at a secant point
    that moves log x by less than ``x_tol`` (secant convergence is superlinear, so that
    point is already much closer than ``x_tol``).
    """
    log_target = math.log(target)
    evaluations: list[tuple[float, float]] = []

    def g(u: float) -> float:
        value = f(math.exp(u))
        evaluations.append((math.exp(u), value))
        return math.log(max(value, 1e-300)) - log_target

    a = math.log(x0)
    fa = g(a)
    if abs(fa) < rel_tol:
        return x0, evaluations
    step = -fa / slope if slope < 0 else math.copysign(0.5, fa)
    b = a + max(min(step, 2.0), -2.0)
    fb = g(b)
    illinois_side = 0
    while len(evaluations) < max_evals:
        if abs(fb) < rel_tol:
            return math.exp(b), evaluations
        bracketed = fa * fb < 0
        c = b - fb * (b - a) / (fb - fa) if fb != fa else b + math.copysign(0.5, fb)
        if not bracketed:
            limit = 2.0 * abs(b - a) + 0.1
            c = b + max(min(c - b, limit), -limit)
        if abs(c - b) < x_tol:
            return math.exp(c), evaluations
        fc = g(c)
        if bracketed:
            if fc * fb < 0:
                a, fa, illinois_side = b, fb, 0
            else:
                if illinois_side:
                    fa /= 2.0
                illinois_side = 1
        else:
            a, fa = b, fb
        b, fb = c, fc
    return math.exp(b), evaluations


def _solve_decreasing(f: Callable[[float], float], target: float, x0: float) -> float:
    """x in [x0/2, 2 x0] with f(x) ~ target for a cheap decreasing f (bisection in log x); x0 if not bracketed."""
    lo, hi = math.log(x0 / 2), math.log(x0 * 2)
    if not (f(math.exp(lo)) > target >= f(math.exp(hi))):
        return x0
    for _ in range(50):
        mid = (lo + hi) / 2
        if f(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def _smallest_on_grid(exact: Callable[[float], float], target: float, start: float,
                      predict: Callable[[float], float] | None = None, margin: float = 0.0) -> float:
    """Smallest 3-digit grid value x with exact(x) <= target, for a decreasing ``exact``.

    Starts from the grid value at or above ``start``. With ``predict`` (cheap, equal to
    ``exact`` up to a slowly varying offset), the offset measured by the first tight
    evaluation re-aims the search once, and the tight evaluation of the grid point
    just below a feasible one is skipped when it is predicted above ``target + margin``.
    Then it gallops and bisects on tight evaluations.
    """
    index = _grid_index_up(start)
    value = exact(_grid_value(index))
    offset = 0.0
    if predict is not None:
        offset = value - predict(_grid_value(index))
        aimed = _grid_index_up(_solve_decreasing(lambda x: predict(x) + offset, target, _grid_value(index)))
        if aimed != index:
            index, value = aimed, exact(_grid_value(aimed))
            offset = value - predict(_grid_value(index))
    lo: int | None = None  # known infeasible
    hi: int | None = None  # known feasible
    if value <= target:
        hi = index
    else:
        lo = index
    jump = 1
    while hi is None:  # gallop up
        candidate = lo + jump
        if _grid_value(candidate) > MAX_NOISE_MULTIPLIER:
            raise AccountingInputError(
                f"target_epsilon {target!r} is not reachable with noise_multiplier <= {MAX_NOISE_MULTIPLIER:g}"
            )
        if exact(_grid_value(candidate)) <= target:
            hi = candidate
        else:
            lo, jump = candidate, jump * 2
    jump = 1
    while lo is None:  # gallop down
        candidate = hi - jump
        if predict is not None and jump == 1 and predict(_grid_value(candidate)) + offset > target + margin:
            return _grid_value(hi)
        if exact(_grid_value(candidate)) > target:
            lo = candidate
        else:
            hi, jump = candidate, jump * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if exact(_grid_value(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return _grid_value(hi)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    workloads: Sequence[tuple[float, int]],
    fixed_events: Sequence[Event] = (),
    accountant: str = "prv",
    unit: str = "record",
) -> float:
    """Smallest noise multiplier, rounded up to 3 significant digits, meeting the target.

    ``workloads`` holds one ``(sample_rate, steps)`` pair per client. The result is the
    smallest 3-digit sigma such that, for every client i,
    ``upper(eps([PoissonGaussianEvent(sigma, q_i, T_i)] + fixed_events)) <= target_epsilon``
    with the chosen accountant's default precision. Raises AccountingInputError if
    ``fixed_events`` alone already spend the target.
    """
    target = check_epsilon(target_epsilon)
    delta = rdp.check_delta(delta)
    accountant = check_accountant(accountant)
    if unit not in ("record", "client"):
        raise AccountingInputError(f"unit must be one of record, client, got {unit!r}")
    loads = _check_workloads(workloads, unit)
    fixed = _check_fixed(fixed_events, unit)
    if fixed:
        spent_fixed = bound(fixed, delta=delta, accountant=accountant)
        if spent_fixed.upper >= target:
            raise AccountingInputError(
                f"target_epsilon must exceed what fixed_events alone spend (upper {spent_fixed.upper:.4g}), "
                f"got {target!r}"
            )
    sigmas = [
        _calibrate_one(q, steps, target=target, delta=delta, fixed=fixed, accountant=accountant, unit=unit)
        for q, steps in pareto_workloads(loads)
    ]
    return max(sigmas)


@dataclass(frozen=True)
class SitePlan:
    """One site's planned record-level releases: ``steps`` Poisson-Gaussian steps at ``sample_rate``
    (the σ to be found), plus ``fixed_events`` it spends whatever σ is (e.g. the DP initialisation)."""

    sample_rate: float
    steps: int
    fixed_events: tuple[Event, ...] = ()


def calibrate_sites(
    *,
    target_epsilon: float,
    delta: float,
    sites: Sequence[SitePlan],
    accountant: str = "prv",
    unit: str = "record",
) -> float:
    """The one σ calibration of a federated run: ``dpfed plan`` and training both call it.

    The smallest 3-significant-digit σ with which every site's planned events stay within
    ``target_epsilon``: sites with the same fixed events share one :func:`calibrate_noise`
    (whose workloads keep only the Pareto-worst (q, steps)), and the largest σ over those
    groups is returned. Raises AccountingInputError when a site's fixed events alone reach
    the target.
    """
    if not sites:
        raise AccountingInputError("sites must hold at least one SitePlan, got none")
    groups: dict[tuple[Event, ...], list[tuple[float, int]]] = {}
    for site in sites:
        if not isinstance(site, SitePlan):
            raise AccountingInputError(f"sites must hold SitePlan values, got {type(site).__name__}")
        groups.setdefault(tuple(site.fixed_events), []).append((site.sample_rate, site.steps))
    return max(calibrate_noise(target_epsilon=target_epsilon, delta=delta, workloads=loads, fixed_events=fixed,
                               accountant=accountant, unit=unit)
               for fixed, loads in groups.items())


def _calibrate_one(q: float, steps: int, *, target: float, delta: float, fixed: list[Event],
                   accountant: str, unit: str) -> float:
    def events(sigma: float) -> list[Event]:
        return [PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps, unit=unit), *fixed]

    curve = _RdpCurve(sample_rate=q, delta=delta, fixed=fixed)
    rdp_eps = lambda sigma: curve.epsilon(sigma, steps)  # noqa: E731
    sigma_rdp, _ = _root_log_log(rdp_eps, target, 1.0, -1.0, rel_tol=1e-5)
    log.debug("q=%g steps=%d: RDP root sigma=%.6g", q, steps, sigma_rdp)
    if accountant == "rdp":
        return _smallest_on_grid(rdp_eps, target, sigma_rdp)

    def exact(sigma: float) -> float:
        return prv.epsilon(events(sigma), delta=delta).upper

    coarse_error = max(0.05, target / 30.0)

    def model(sigma: float) -> float:
        coarse, used = prv._epsilon_with_error(events(sigma), delta=delta, eps_error=coarse_error)
        if used == 0.0:  # PRV fell back to RDP: the model is the fallback itself
            return coarse.upper
        return coarse.upper - used + prv.default_eps_error(rdp_eps(sigma))

    slope = math.log(rdp_eps(sigma_rdp * 1.01) / rdp_eps(sigma_rdp)) / math.log(1.01)
    sigma_star, points = _root_log_log(model, target, sigma_rdp, slope, rel_tol=2e-4, x_tol=2e-3, max_evals=8)
    points.sort()

    def predict(sigma: float) -> float:  # log-log interpolation of the coarse model
        xs = [p[0] for p in points]
        i = int(np.clip(np.searchsorted(xs, sigma), 1, len(points) - 1)) if len(points) > 1 else 0
        if len(points) == 1:
            return points[0][1] * (sigma / points[0][0]) ** slope
        (x0, y0), (x1, y1) = points[i - 1], points[i]
        if x0 == x1 or y0 <= 0 or y1 <= 0:
            return y1
        k = math.log(y1 / y0) / math.log(x1 / x0)
        return y0 * (sigma / x0) ** k

    margin = 1e-3 + 5e-4 * target
    return _smallest_on_grid(exact, target, sigma_star, predict=predict, margin=margin)


def max_rounds(
    *,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    fixed_events: Sequence[Event] = (),
    accountant: str = "prv",
    unit: str = "record",
    limit: int = DEFAULT_ROUNDS_LIMIT,
) -> int:
    """Largest R with ``upper(eps(R * steps_per_round steps + fixed_events)) <= target_epsilon``.

    Returns 0 if not even one round fits; the answer is capped at ``limit``.
    """
    target = check_epsilon(target_epsilon)
    delta = rdp.check_delta(delta)
    accountant = check_accountant(accountant)
    step = PoissonGaussianEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                count=_check_positive_int(steps_per_round, "steps_per_round"), unit=unit)
    limit = _check_positive_int(limit, "limit")
    fixed = _check_fixed(fixed_events, unit)
    curve = _RdpCurve(sample_rate=step.sample_rate, delta=delta, fixed=fixed)
    rdp_eps = lambda r: curve.epsilon(step.noise_multiplier, r * step.count)  # noqa: E731
    r_rdp = _largest_int(lambda r: rdp_eps(r) <= target, 0, limit)
    if accountant == "rdp":
        return r_rdp

    def events(r: int) -> list[Event]:
        return [PoissonGaussianEvent(noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
                                     count=r * step.count, unit=unit), *fixed]

    def exact(r: int) -> float:
        return prv.epsilon(events(r), delta=delta).upper

    if r_rdp >= limit:
        return limit if exact(limit) <= target else _largest_int(lambda r: exact(r) <= target, 0, limit)
    # Coarse model over rounds with one accountant, then tight checks at the boundary.
    coarse_error = max(0.1, 0.05 * target)
    hi = min(limit, max(3 * r_rdp + 2, 4))

    def predicted(rounds: list[int]) -> dict[int, float]:
        bounds = prv.epsilon_over_rounds([step], rounds=rounds, delta=delta, fixed_events=fixed,
                                         eps_error=coarse_error)
        return {r: b.upper - coarse_error + prv.default_eps_error(rdp_eps(r)) for r, b in zip(rounds, bounds)}

    while True:  # pass 1: a geometric sweep that brackets the boundary
        sweep = predicted(sorted({int(r) for r in np.geomspace(max(r_rdp, 1), hi, 8).round()}))
        if sweep[max(sweep)] > target or hi >= limit:
            break
        hi = min(limit, 2 * hi)
    lo = max((r for r, e in sweep.items() if e <= target), default=0)
    above = min((r for r in sweep if r > lo), default=limit)
    if above - lo > 1:  # pass 2: an even sweep inside the bracket
        inner = predicted(sorted({int(r) for r in np.linspace(lo + 1, above - 1, min(10, above - lo - 1)).round()}))
        sweep.update(inner)
        lo = max((r for r, e in sweep.items() if e <= target), default=0)
        above = min((r for r in sweep if r > lo), default=limit)
    guess = lo
    if above - lo > 1:  # interpolate linearly in epsilon between the bracketing points
        e_lo = sweep.get(lo, 0.0)
        e_hi = sweep[above]
        guess = lo + int((target - e_lo) / (e_hi - e_lo) * (above - lo)) if e_hi > e_lo else lo
    guess = min(max(guess, 1), limit)
    # tight checks around the guess: gallop to a bracket [ok, bad), then bisect
    if exact(guess) <= target:
        ok, jump = guess, 1
        while ok + jump <= limit and exact(ok + jump) <= target:
            ok, jump = ok + jump, jump * 2
        bad = min(ok + jump, limit + 1)
    else:
        bad, jump = guess, 1
        while bad - jump >= 1 and exact(bad - jump) > target:
            bad, jump = bad - jump, jump * 2
        ok = max(bad - jump, 0)
    while bad - ok > 1:
        mid = (ok + bad) // 2
        if exact(mid) <= target:
            ok = mid
        else:
            bad = mid
    return ok


def _largest_int(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest integer r in [lo, hi] with ok(r) for a monotone (true then false) ok; lo if none."""
    if ok(hi):
        return hi
    probe = max(lo + 1, 1)
    while probe < hi and ok(probe):  # gallop
        lo, probe = probe, min(hi, probe * 2)
    hi = probe
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_curve(
    *,
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int | Sequence[int],
    fixed_events: Sequence[Event] = (),
    accountant: str = "prv",
    unit: str = "record",
    points: int = 25,
) -> list[tuple[int, EpsilonBound]]:
    """Epsilon after each number of rounds (``rounds``: a list, or R for ~``points`` values in 1..R)."""
    delta = rdp.check_delta(delta)
    accountant = check_accountant(accountant)
    step = PoissonGaussianEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                count=_check_positive_int(steps_per_round, "steps_per_round"), unit=unit)
    fixed = _check_fixed(fixed_events, unit)
    if isinstance(rounds, numbers.Integral) and not isinstance(rounds, bool):
        total = _check_positive_int(rounds, "rounds")
        grid = sorted({int(r) for r in np.linspace(1, total, min(points, total)).round()})
    else:
        grid = sorted({_check_positive_int(r, "rounds") for r in rounds})
    if accountant == "prv":
        return list(zip(grid, prv.epsilon_over_rounds([step], rounds=grid, delta=delta, fixed_events=fixed)))
    curve = _RdpCurve(sample_rate=step.sample_rate, delta=delta, fixed=fixed)
    out = []
    for r in grid:
        value = curve.epsilon(step.noise_multiplier, r * step.count)
        out.append((r, EpsilonBound(lower=0.0, estimate=value, upper=value)))
    return out


def epsilon_by_noise(
    *,
    noise_multipliers: Sequence[float],
    delta: float,
    sample_rate: float,
    steps: int,
    fixed_events: Sequence[Event] = (),
    accountant: str = "prv",
    unit: str = "record",
) -> list[tuple[float, EpsilonBound]]:
    """Epsilon for each noise multiplier (the sigma-against-epsilon trade-off, read either way)."""
    fixed = _check_fixed(fixed_events, unit)
    out = []
    for sigma in noise_multipliers:
        event = PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=sample_rate, count=steps, unit=unit)
        out.append((event.noise_multiplier, bound([event, *fixed], delta=delta, accountant=accountant)))
    return out
