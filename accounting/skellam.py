"""Rényi-DP bounds for the Poisson-subsampled multidimensional Skellam mechanism (pure numpy/scipy).

The mechanism (distributed DP with secure aggregation, :mod:`dpfed.secure_encoding`): each of K
sites adds an integer noise share to its integer-encoded sum; secure aggregation reveals only
the total. A Skellam share is ``Poisson(mu_site / 2) - Poisson(mu_site / 2)`` per coordinate,
and independent Skellam variables sum to a Skellam variable, so the total carries
``Sk(mu_total)`` with ``mu_total = sum of the shares' mu``.

**Convention** (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021, arXiv 2110.04995, Sec. 3): ``mu`` is the *variance* of one
coordinate, ``Sk(mu) = Poisson(mu/2) - Poisson(mu/2)`` with pmf ``P(k) = exp(-mu) I_k(mu)``
(``I_k``: modified Bessel function of the first kind). Everywhere in this module ``mu`` is
that variance, in the integer units of the encoded query, and the sensitivities are the L1
and L2 norms of the largest change one privacy unit makes to the *integer* sum (add/remove
one record; with the encoding of :mod:`dpfed.secure_encoding` that change is one record's
rounded vector, an integer vector, so ``l2 >= 1`` and ``l1 >= l2``).

Bounds, all valid upper bounds on the true RDP at **integer orders alpha >= 2 only**:

- :func:`skellam_rdp`: the multidimensional Skellam bound (arXiv 2110.04995, the RDP theorem
  for the multidimensional Skellam mechanism, Sec. 3; "Theorem 3.5" in v2, cited as
  "Corollary 3.6" / "Corollary 4.1" by other versions and implementations; the expression
  matches tensorflow_federated's distributed_dp ``_skellam_rdp`` at ``scale = 1``)::

      eps(alpha) <= alpha l2^2 / (2 mu) + min( ((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2),  3 l1 / (2 mu) )

  The first term is the Gaussian mechanism's RDP with variance ``mu``; the ``min`` is the
  price of discreteness and vanishes like ``1/mu`` relative to it.
- :func:`poisson_subsampled_rdp`: Zhu & Wang, "Poisson Subsampled Rényi Differential
  Privacy", ICML 2019 (PMLR 97), Theorem 6, the general upper bound for *any* mechanism
  (no condition on the mechanism, unlike their tighter bound, which needs the condition of
  their Theorem 8; tensorflow_federated's distributed_dp ``_compute_rdp_subsampled`` with
  ``upper_bound=True`` computes the same expression): for integer alpha >= 2 and rate q,

      eps'(alpha) <= 1/(alpha-1) log[ (1-q)^(alpha-1) (alpha q - q + 1)
                                     + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                                     + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ]

  It needs the base curve at every integer order 2..alpha, hence the consecutive
  :data:`ORDERS`. We also take the minimum with the base ``eps(alpha)``: subsampling never
  increases the Rényi divergence (``exp((alpha-1) D_alpha)`` is jointly convex, van Erven &
  Harremoës 2014, IEEE Trans. IT 60(7), Theorem 13 for the quasi-convexity of ``D_alpha``).
- Composition over steps adds RDP (Mironov 2017, arXiv 1702.07476, Prop. 1); conversion to
  ``(epsilon, delta)`` is :func:`accounting.rdp.epsilon_from_rdp` (Canonne, Kamath, Steinke
  2020, arXiv 2004.00010v4, Prop. 12), the same one :mod:`accounting.rdp` uses.

Two views (issue 16, "Two numbers, honestly"):

- everyone who sees only the sum (server, other sites, released model): ``mu_total``;
- a colluding server that sees one site's message (secure aggregation broken): the record's
  own site's share alone, ``mu_site = mu_total / min_sites`` (:func:`site_mu`).

No fractional orders: for very small epsilon (below about 0.1) an accountant with orders near
1 would be tighter; this one stays a valid upper bound.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from accounting import rdp as gaussian_rdp
from accounting.errors import AccountingError, AccountingInputError
from accounting.events import GAUSSIAN_TYPES, PoissonSkellamEvent, check_event, privacy_unit
from accounting.rdp import check_delta, epsilon_from_rdp

log = logging.getLogger(__name__)

#: Consecutive integer orders 2..256 (Zhu & Wang's bound at order alpha uses every order <= alpha).
ORDERS: np.ndarray = np.arange(2, 257, dtype=float)

MAX_MU = 1e40  # calibration gives up above this variance (an epsilon that needs more is not plannable)
_LOG3 = math.log(3.0)

__all__ = [
    "ORDERS",
    "PoissonSkellam",
    "calibrate_mu",
    "colluding_server_epsilon",
    "composed_epsilon",
    "epsilon",
    "from_event",
    "poisson_subsampled_rdp",
    "rdp_curve",
    "site_mu",
    "skellam_rdp",
]


# -- validation ---------------------------------------------------------------------------
def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingInputError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise AccountingInputError(f"{name} must be finite, got {value!r}")
    return value


def _check_mu(mu: object, name: str = "mu") -> float:
    mu = _real(mu, name)
    if mu <= 0.0:
        raise AccountingInputError(f"{name} (the Skellam variance per coordinate) must be > 0, got {mu!r}")
    return mu


def _check_sensitivities(l2: object, l1: object) -> tuple[float, float]:
    l2 = _real(l2, "l2_sensitivity")
    l1 = _real(l1, "l1_sensitivity")
    if l2 < 1.0:
        raise AccountingInputError(
            f"l2_sensitivity must be >= 1 (integer units: a nonzero integer vector has norm >= 1), got {l2!r}")
    if l1 < l2:
        raise AccountingInputError(f"l1_sensitivity must be >= l2_sensitivity ({l2!r}), got {l1!r}")
    return l2, l1


def _check_rate(q: object) -> float:
    q = _real(q, "sample_rate")
    if not (0.0 < q <= 1.0):
        raise AccountingInputError(f"sample_rate must be in (0, 1], got {q!r}")
    return q


def _check_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise AccountingInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_orders(orders: object) -> np.ndarray:
    orders = np.asarray(orders, dtype=float)
    if orders.ndim != 1 or orders.size == 0:
        raise AccountingInputError(f"orders must be a non-empty 1-D array, got shape {orders.shape}")
    if orders[0] != 2.0 or np.any(np.diff(orders) != 1.0):
        raise AccountingInputError("orders must be the consecutive integers 2, 3, ..., A (Zhu & Wang's bound "
                                   f"at order alpha uses every order <= alpha), got {orders[:4]!r}...")
    return orders


# -- the mechanism record -----------------------------------------------------------------
@dataclass(frozen=True)
class PoissonSkellam:
    """``steps`` releases of the Poisson-subsampled multidimensional Skellam mechanism.

    ``mu``: variance per coordinate of the Skellam noise in the released integer sum;
    ``l2_sensitivity`` / ``l1_sensitivity``: norms of one record's largest contribution to
    that integer sum; ``sample_rate``: the Poisson rate of the record's own site; ``steps``:
    how many such releases. Keyword-only; validated on construction.
    """

    mu: float
    l2_sensitivity: float
    l1_sensitivity: float
    sample_rate: float
    steps: int = 1

    def __init__(self, *, mu: float, l2_sensitivity: float, l1_sensitivity: float, sample_rate: float,
                 steps: int = 1) -> None:
        l2, l1 = _check_sensitivities(l2_sensitivity, l1_sensitivity)
        object.__setattr__(self, "mu", _check_mu(mu))
        object.__setattr__(self, "l2_sensitivity", l2)
        object.__setattr__(self, "l1_sensitivity", l1)
        object.__setattr__(self, "sample_rate", _check_rate(sample_rate))
        object.__setattr__(self, "steps", _check_int(steps, "steps"))


# -- bounds -------------------------------------------------------------------------------
def skellam_rdp(*, mu: float, l2_sensitivity: float, l1_sensitivity: float,
                orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP of one (non-subsampled) multidimensional Skellam release: Agarwal, Kairouz, Liu 2021 (arXiv 2110.04995), Sec. 3.

    ``alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))`` at each
    integer order, ``mu`` the variance per coordinate (module docstring for units).
    """
    mu = _check_mu(mu)
    l2, l1 = _check_sensitivities(l2_sensitivity, l1_sensitivity)
    alpha = np.asarray(orders, dtype=float)
    if np.any(alpha < 2.0) or np.any(alpha != np.round(alpha)):
        raise AccountingInputError("the Skellam bound is used at integer orders >= 2 only")
    gaussian = alpha * l2**2 / (2.0 * mu)
    discrete = np.minimum(((2.0 * alpha - 1.0) * l2**2 + 6.0 * l1) / (4.0 * mu**2), 3.0 * l1 / (2.0 * mu))
    return gaussian + discrete


def poisson_subsampled_rdp(*, base_rdp: np.ndarray, sample_rate: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """Zhu & Wang, ICML 2019 (PMLR 97), Theorem 6: RDP of any mechanism after Poisson subsampling at rate q.

    ``base_rdp[i]`` is the base mechanism's RDP at ``orders[i]`` (the consecutive integers 2..A,
    a bound valid in both directions of the add/remove relation); returns the subsampled
    bound at the same orders, capped by ``base_rdp`` (subsampling never hurts).
    """
    orders = _check_orders(orders)
    q = _check_rate(sample_rate)
    base = np.asarray(base_rdp, dtype=float)
    if base.shape != orders.shape:
        raise AccountingInputError(f"base_rdp must have the shape of orders {orders.shape}, got {base.shape}")
    if np.any(np.isnan(base)) or np.any(base < 0):
        raise AccountingInputError("base_rdp must be >= 0 (and not NaN) at every order")
    if q == 1.0:
        return base.copy()
    alpha = orders[:, None]  # (A, 1)
    ell = orders[None, :]  # (1, L): l = 2..A
    valid = ell <= alpha
    ell_safe = np.where(valid, ell, 2.0)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(ell_safe + 1) - special.gammaln(alpha - ell_safe + 1)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_terms = (log_binom + ell_safe * log_q + (alpha - ell_safe) * log_1mq
                 + (ell_safe - 1.0) * base[None, :]                    # e^((l-1) eps(l)); l = 2 gives e^eps(2)
                 + np.where(ell_safe >= 3.0, _LOG3, 0.0))              # the factor 3 of the terms l >= 3
    log_terms = np.where(valid, log_terms, -np.inf)
    head = (orders - 1.0) * log_1mq + np.log1p((orders - 1.0) * q)  # (1-q)^(alpha-1) (alpha q - q + 1)
    total = special.logsumexp(np.concatenate([head[:, None], log_terms], axis=1), axis=1)
    subsampled = np.maximum(total, 0.0) / (orders - 1.0)
    return np.minimum(subsampled, base)


def _step_rdp(mechanism: PoissonSkellam, orders: np.ndarray) -> np.ndarray:
    base = skellam_rdp(mu=mechanism.mu, l2_sensitivity=mechanism.l2_sensitivity,
                       l1_sensitivity=mechanism.l1_sensitivity, orders=orders)
    return poisson_subsampled_rdp(base_rdp=base, sample_rate=mechanism.sample_rate, orders=orders)


def rdp_curve(mechanisms: Sequence[PoissonSkellam], *, orders: np.ndarray = ORDERS) -> np.ndarray:
    """Summed RDP curve of the composition (Mironov 2017, arXiv 1702.07476, Prop. 1)."""
    orders = _check_orders(orders)
    total = np.zeros_like(orders)
    for mechanism in mechanisms:
        if not isinstance(mechanism, PoissonSkellam):
            raise AccountingInputError(f"mechanisms must be PoissonSkellam records, got {type(mechanism).__name__}")
        total += mechanism.steps * _step_rdp(mechanism, orders)
    return total


def epsilon(mechanisms: Sequence[PoissonSkellam], *, delta: float, orders: np.ndarray = ORDERS) -> float:
    """RDP upper bound on epsilon at ``delta`` for the composition of ``mechanisms`` (0 if empty).

    Conversion: Canonne, Kamath, Steinke 2020 (arXiv 2004.00010v4), Prop. 12, via
    :func:`accounting.rdp.epsilon_from_rdp`.
    """
    delta = check_delta(delta)
    mechanisms = list(mechanisms)
    if not mechanisms:
        return 0.0
    value, _ = epsilon_from_rdp(orders=orders, rdp=rdp_curve(mechanisms, orders=orders), delta=delta)
    return value


def from_event(event: PoissonSkellamEvent) -> PoissonSkellam:
    """The mechanism record of a ledger event (:class:`accounting.events.PoissonSkellamEvent`)."""
    return PoissonSkellam(mu=event.mu, l2_sensitivity=event.l2_sensitivity, l1_sensitivity=event.l1_sensitivity,
                          sample_rate=event.sample_rate, steps=event.count)


def composed_epsilon(events: Sequence[object], *, delta: float, orders: np.ndarray = ORDERS) -> float:
    """RDP upper bound on epsilon for ledger events that include Skellam releases (0 if empty).

    Skellam events: :func:`rdp_curve`; Gaussian events (a DP initialisation, or a run that
    mixes both kinds): :func:`accounting.rdp.rdp_curve` (Mironov, Talwar, Zhang 2019) at the
    same integer orders. RDP adds under composition (Mironov 2017, arXiv 1702.07476, Prop. 1),
    so the sum is an upper bound for the mixture; converted with Canonne, Kamath, Steinke
    2020 (arXiv 2004.00010v4), Prop. 12. Events must share one privacy unit.
    """
    delta = check_delta(delta)
    events = list(events)
    privacy_unit(events)
    if not events:
        return 0.0
    orders = _check_orders(orders)
    skellam = [from_event(e) for e in events if isinstance(e, PoissonSkellamEvent)]
    gaussian = [check_event(e) for e in events if isinstance(e, GAUSSIAN_TYPES)]
    curve = rdp_curve(skellam, orders=orders) if skellam else np.zeros_like(orders)
    if gaussian:
        curve = curve + gaussian_rdp.rdp_curve(gaussian, orders=orders)
    value, _ = epsilon_from_rdp(orders=orders, rdp=curve, delta=delta)
    return value


def site_mu(*, mu_total: float, min_sites: int) -> float:
    """Variance of one site's share when ``min_sites`` shares must add up to ``mu_total``."""
    return _check_mu(mu_total, "mu_total") / _check_int(min_sites, "min_sites")


def colluding_server_epsilon(*, mu_total: float, min_sites: int, l2_sensitivity: float, l1_sensitivity: float,
                             sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of one site's own message alone (secure aggregation broken): its share has ``mu_total / min_sites``."""
    mechanism = PoissonSkellam(mu=site_mu(mu_total=mu_total, min_sites=min_sites), l2_sensitivity=l2_sensitivity,
                               l1_sensitivity=l1_sensitivity, sample_rate=sample_rate, steps=steps)
    return epsilon([mechanism], delta=delta)


def calibrate_mu(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                 l2_sensitivity: float, l1_sensitivity: float, rel_tol: float = 1e-4) -> float:
    """Smallest total variance ``mu`` (up to ``rel_tol``) whose ``steps`` releases stay within (target_epsilon, delta).

    Bisection on log(mu) (epsilon decreases in mu: every term of both bounds does); the
    returned mu is checked: :func:`epsilon` at it is <= target_epsilon, and at
    ``mu / (1 + rel_tol)`` it is above. Raises :class:`AccountingInputError` for bad input and
    :class:`AccountingError` if no mu below :data:`MAX_MU` reaches the target.
    """
    target = _real(target_epsilon, "target_epsilon")
    if target <= 0:
        raise AccountingInputError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    rel_tol = _real(rel_tol, "rel_tol")
    if not (0.0 < rel_tol < 1.0):
        raise AccountingInputError(f"rel_tol must be in (0, 1), got {rel_tol!r}")

    def eps_at(mu: float) -> float:
        return epsilon([PoissonSkellam(mu=mu, l2_sensitivity=l2_sensitivity, l1_sensitivity=l1_sensitivity,
                                       sample_rate=sample_rate, steps=steps)], delta=delta)

    l2, _ = _check_sensitivities(l2_sensitivity, l1_sensitivity)
    lo = hi = l2**2  # noise multiplier 1
    if eps_at(hi) > target:
        while eps_at(hi) > target:
            lo, hi = hi, hi * 4.0
            if hi > MAX_MU:
                raise AccountingError(f"no Skellam variance below {MAX_MU:g} reaches epsilon {target!r} at delta {delta!r}")
    else:
        while eps_at(lo) <= target:
            lo, hi = lo / 4.0, lo
    while hi / lo > 1.0 + rel_tol:  # invariant: eps(lo) > target >= eps(hi)
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    if not eps_at(hi) <= target:  # the invariant, checked on the value we return
        raise AccountingError(f"calibration failed: epsilon at mu={hi!r} exceeds {target!r}")
    log.debug("calibrated Skellam mu=%.6g for epsilon %.4g (delta %.2g, q %.4g, %d steps)",
              hi, target, delta, sample_rate, steps)
    return hi
