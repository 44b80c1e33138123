"""Statistics of membership-inference audits: pure functions over numbers and numpy arrays.

Three families, each with its guarantee stated where it is computed:

* **Lower bounds on epsilon** that hold with the stated confidence for a mechanism that really is
  (epsilon, delta)-DP: the one-run audit of Steinke, Nasr & Jagielski (arXiv 2305.08846) and the
  hypothesis-testing bound from false-positive / false-negative counts (Jagielski, Ullman & Oprea,
  arXiv 2006.07709).
* **Descriptive attack metrics**: ROC curve, AUC, TPR at a fixed FPR, Clopper-Pearson intervals.
* **Gaussian-DP estimates** (Dong, Roth & Su, arXiv 1905.02383): a point estimate of mu from one
  (FPR, FNR) pair and its conversion to (epsilon, delta). These are estimates, not bounds.

Nothing here draws random numbers except :func:`bootstrap_auc_ci` and the optional tie breaking of
:func:`one_run_audit`, which take a caller's ``numpy.random.Generator``. Invalid input raises
``ValueError`` naming the parameter, the rule and the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "one_run_ceiling",
    "one_run_audit",
    "one_run_audit_search",
    "default_audit_grid",
    "clopper_pearson",
    "clopper_pearson_upper",
    "epsilon_lower_bound_from_rates",
    "roc_curve",
    "auc",
    "tpr_at_fpr",
    "bootstrap_auc_ci",
    "gdp_mu_from_rates",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu_from_epsilon",
]

# Step of the upward scan that brackets the first epsilon where the one-run p-value reaches the
# significance level; bisection then refines inside that bracket.
_EPS_SCAN_STEP = 0.5
# Beyond this the logistic q = 1/(1+e^-eps) is 1.0 in double precision, so p(eps) = 1: the scan
# always stops before it.
_EPS_SCAN_MAX = 100.0


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _require_int(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _require_real(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number; got {value!r}") from None
    if math.isnan(x):
        raise ValueError(f"{name} must be a real number, not NaN; got {value!r}")
    return x


def _require_in_closed(name: str, value: Any, low: float, high: float) -> float:
    x = _require_real(name, value)
    if not low <= x <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}]; got {value!r}")
    return x


def _require_confidence(value: Any, name: str = "confidence") -> float:
    x = _require_real(name, value)
    if not 0.0 < x < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1); got {value!r}")
    return x


def _require_epsilon(value: Any, name: str = "epsilon") -> float:
    x = _require_real(name, value)
    if not (0.0 <= x < math.inf):
        raise ValueError(f"{name} must be finite and >= 0; got {value!r}")
    return x


def _scores_labels(scores: Any, labels: Any, *, labels_name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair (scores, 0/1 labels) of equal-length 1-D arrays; returns (float64, bool)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array; got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{labels_name} must have the same shape as scores {s.shape}; got {y.shape}")
    if s.size == 0:
        raise ValueError("scores must not be empty; got 0 elements")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite; got {int(np.sum(~np.isfinite(s)))} non-finite values")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{labels_name} must be booleans or 0/1 (1 = member); got values {np.unique(y)[:5]!r}")
        y = y == 1
    return s, y


def _require_both_classes(y: np.ndarray, labels_name: str = "labels") -> tuple[int, int]:
    n_pos = int(np.sum(y))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{labels_name} must contain both members (1) and non-members (0); got {n_pos} members and {n_neg} non-members"
        )
    return n_pos, n_neg


# --------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr & Jagielski 2023)
# --------------------------------------------------------------------------------------------


def one_run_p_value(*, epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """P-value of "at least ``v`` of ``r`` guesses correct" under the null "the mechanism is (epsilon, delta)-DP".

    Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
    arXiv 2305.08846, Theorem 3.1 (the (epsilon, delta) form with abstentions). With
    ``q = 1/(1+e^-epsilon)`` and ``W ~ Bin(r, q)``::

        beta  = P[W >= v]
        alpha = max_{1 <= i <= v} (1/i) P[v > W >= v - i]
        p     = min(1, beta + 2 m delta alpha)

    The theorem's maximum runs over ``1 <= i <= m``; for ``i > v`` the numerator is constant
    (``P[W < v]``), so the maximum is reached at some ``i <= v``. All binomial terms are computed
    in log space (``logsf``, ``logpmf`` and a running log-sum-exp), so large ``r`` neither
    overflows nor loses the far tail.

    Args:
        epsilon: null-hypothesis epsilon, finite and >= 0.
        delta: null-hypothesis delta in [0, 1].
        m: number of canaries, each included independently with probability 1/2 (>= 1).
        r: number of guesses made (abstentions excluded), 0 <= r <= m.
        v: number of correct guesses, 0 <= v <= r.

    Returns:
        The p-value in [0, 1]; small values reject the null.
    """
    epsilon = _require_epsilon(epsilon)
    delta = _require_in_closed("delta", delta, 0.0, 1.0)
    m = _require_int("m", m, minimum=1)
    r = _require_int("r", r, minimum=0)
    v = _require_int("v", v, minimum=0)
    if r > m:
        raise ValueError(f"r must satisfy r <= m = {m}; got r = {r}")
    if v > r:
        raise ValueError(f"v must satisfy v <= r = {r}; got v = {v}")
    return _one_run_p_value(epsilon, delta, m, r, v)


def _one_run_p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    if v == 0:  # beta = P[W >= 0] = 1
        return 1.0
    q = special.expit(epsilon)  # 1/(1+e^-eps), accuracy of eps-DP randomised response
    log_beta = float(stats.binom.logsf(v - 1, r, q))
    p = math.exp(log_beta)
    if delta > 0.0:
        k = np.arange(v - 1, -1, -1)  # v-1, v-2, ..., 0
        log_pmf = stats.binom.logpmf(k, r, q)
        # entry i-1 holds log P[v-i <= W <= v-1] for i = 1..v
        log_window = np.logaddexp.accumulate(log_pmf)
        log_alpha = float(np.max(log_window - np.log(np.arange(1, v + 1))))
        p += 2.0 * m * delta * math.exp(log_alpha)
    return min(1.0, p)


def one_run_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-6) -> float:
    """Largest epsilon rejected by the one-run audit: ``sup{eps >= 0 : p(eps') < 1 - confidence for all eps' <= eps}``.

    Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846), Theorem 3.1 inverted as in their
    Section 3 / appendix code: the bound is where the p-value of :func:`one_run_p_value` first
    reaches ``1 - confidence``. Reading it as "the first crossing" keeps the bound valid even if
    ``p`` were not monotone in epsilon: if the true epsilon is ``eps0 < eps_LB`` then
    ``p(eps0) < 1 - confidence``, which happens with probability at most ``1 - confidence``.
    (``p`` is monotone non-decreasing on every case the tests scan.) The crossing is bracketed
    by an upward scan in steps of 0.5 and refined by bisection; the returned value is the lower
    end of the final bracket, so ``p(result) < 1 - confidence`` always holds (or result is 0).

    Args:
        m, r, v, delta: as in :func:`one_run_p_value`.
        confidence: one-sided confidence level in (0, 1), e.g. 0.95.
        tol: width of the final bisection bracket (> 0).

    Returns:
        epsilon_LB >= 0; 0 when even epsilon = 0 is not rejected.
    """
    delta = _require_in_closed("delta", delta, 0.0, 1.0)
    m = _require_int("m", m, minimum=1)
    r = _require_int("r", r, minimum=0)
    v = _require_int("v", v, minimum=0)
    confidence = _require_confidence(confidence)
    tol = _require_real("tol", tol)
    if not tol > 0.0:
        raise ValueError(f"tol must be > 0; got {tol!r}")
    if r > m:
        raise ValueError(f"r must satisfy r <= m = {m}; got r = {r}")
    if v > r:
        raise ValueError(f"v must satisfy v <= r = {r}; got v = {v}")

    level = 1.0 - confidence
    if _one_run_p_value(0.0, delta, m, r, v) >= level:
        return 0.0
    lo = 0.0
    hi = _EPS_SCAN_STEP
    while _one_run_p_value(hi, delta, m, r, v) < level:
        lo = hi
        hi += _EPS_SCAN_STEP
        if hi > _EPS_SCAN_MAX:  # unreachable: q == 1.0 there, so p == 1
            raise RuntimeError(f"one-run p-value stayed below {level} up to epsilon = {_EPS_SCAN_MAX}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if _one_run_p_value(mid, delta, m, r, v) < level:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_ceiling(*, m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon lower bound that a one-run audit with ``m`` canaries and ``r`` guesses can show.

    The bound of :func:`one_run_epsilon_lower_bound` with every guess correct (``v = r``);
    Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846), Theorem 3.1. A mechanism whose true
    epsilon exceeds this cannot be shown to by this audit, whatever the attack.
    """
    return one_run_epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=confidence)


def _guess_masks(
    scores: np.ndarray, k_plus: int, k_minus: int, tie_rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Masks of the canaries guessed "in" (top ``k_plus``) and "out" (bottom ``k_minus``).

    Without ``tie_rng``, canaries tied with the first canary outside a set are left out of it
    (abstained on), so each set holds at most ``k_plus`` / ``k_minus`` canaries and depends on
    the scores alone. With ``tie_rng``, ties are broken by a uniformly random order drawn from it.
    Returns (guess_in, guess_out, number of boundary canaries abstained on because of ties).
    """
    m = scores.size
    if tie_rng is not None:
        # lexsort sorts by the last key first: scores, then a random permutation among ties
        order = np.lexsort((tie_rng.permutation(m), -scores))
        guess_in = np.zeros(m, dtype=bool)
        guess_out = np.zeros(m, dtype=bool)
        guess_in[order[:k_plus]] = True
        if k_minus > 0:
            guess_out[order[m - k_minus :]] = True
        return guess_in, guess_out, 0
    ascending = np.sort(scores)
    # "in": strictly above the (k_plus+1)-th largest score; at most k_plus canaries
    if k_plus == 0:
        guess_in = np.zeros(m, dtype=bool)
    elif k_plus == m:
        guess_in = np.ones(m, dtype=bool)
    else:
        guess_in = scores > ascending[m - 1 - k_plus]
    # "out": strictly below the (k_minus+1)-th smallest score; at most k_minus canaries
    if k_minus == 0:
        guess_out = np.zeros(m, dtype=bool)
    elif k_minus == m:
        guess_out = np.ones(m, dtype=bool)
    else:
        guess_out = scores < ascending[k_minus]
    # Disjoint: a canary in both would have <= k_plus scores >= it and <= k_minus scores <= it,
    # i.e. m + 1 <= k_plus + k_minus, which the caller has excluded.
    dropped = (k_plus - int(guess_in.sum())) + (k_minus - int(guess_out.sum()))
    return guess_in, guess_out, dropped


def one_run_audit(
    *,
    scores: Any,
    included: Any,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
    tie_rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """One-run audit from canary scores: guess, count, and bound epsilon (Steinke, Nasr & Jagielski 2023).

    arXiv 2305.08846, Algorithm 1 (the auditing game) and Theorem 3.1: each of the ``m`` canaries
    was included in training independently with probability 1/2 (``included``); after training the
    auditor guesses "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest, and
    abstains on the rest. ``r`` guesses with ``v`` correct give ``epsilon_lower_bound`` at the
    given confidence.

    Validity conditions the caller must meet (the function cannot check them):

    * the inclusion bits were drawn independently with probability 1/2, after the canaries were
      fixed, and the scores were computed without looking at them;
    * ``k_plus`` and ``k_minus`` were fixed *before* seeing the scores. Trying several and keeping
      the best breaks the confidence level; use :func:`one_run_audit_search` for that.

    Ties: without ``tie_rng`` the canaries tied with the first canary outside the top (bottom)
    set are abstained on, so fewer than ``k_plus`` (``k_minus``) guesses may be made
    (``n_abstained_ties`` counts them). With ``tie_rng`` ties are broken uniformly at random.
    Either rule depends on the scores only, never on the inclusion bits or on canary order.

    Args:
        scores: 1-D finite scores, higher = more likely a member (e.g. loss reduction).
        included: 1-D booleans or 0/1, the secret inclusion bits, same length ``m`` as scores.
        k_plus: number of "in" guesses, >= 0.
        k_minus: number of "out" guesses, >= 0, with ``k_plus + k_minus <= m``.
        delta: delta of the null hypothesis, in [0, 1].
        confidence: one-sided confidence level in (0, 1).
        tie_rng: optional generator used only to break ties among equal scores.

    Returns:
        dict with ``m``, ``k_plus``, ``k_minus``, ``n_guess_in``, ``n_guess_out``,
        ``n_abstained_ties``, ``r``, ``v``, ``n_correct_in``, ``n_correct_out``, ``accuracy``
        (``v / r``, NaN when ``r = 0``), ``epsilon_lower_bound``, ``ceiling`` (the bound had all
        ``r`` guesses been right), ``delta`` and ``confidence``.
    """
    s, bits = _scores_labels(scores, included, labels_name="included")
    m = int(s.size)
    k_plus = _require_int("k_plus", k_plus, minimum=0)
    k_minus = _require_int("k_minus", k_minus, minimum=0)
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus must be <= m = {m} (the number of canaries); got {k_plus} + {k_minus}")
    delta = _require_in_closed("delta", delta, 0.0, 1.0)
    confidence = _require_confidence(confidence)
    if tie_rng is not None and not isinstance(tie_rng, np.random.Generator):
        raise ValueError(f"tie_rng must be a numpy.random.Generator or None; got {type(tie_rng).__name__}")

    guess_in, guess_out, dropped = _guess_masks(s, k_plus, k_minus, tie_rng)
    n_guess_in = int(guess_in.sum())
    n_guess_out = int(guess_out.sum())
    n_correct_in = int(np.sum(bits & guess_in))
    n_correct_out = int(np.sum(~bits & guess_out))
    r = n_guess_in + n_guess_out
    v = n_correct_in + n_correct_out
    return {
        "m": m,
        "k_plus": k_plus,
        "k_minus": k_minus,
        "n_guess_in": n_guess_in,
        "n_guess_out": n_guess_out,
        "n_abstained_ties": dropped,
        "r": r,
        "v": v,
        "n_correct_in": n_correct_in,
        "n_correct_out": n_correct_out,
        "accuracy": v / r if r > 0 else math.nan,
        "epsilon_lower_bound": one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence),
        "ceiling": one_run_ceiling(m=m, r=r, delta=delta, confidence=confidence),
        "delta": delta,
        "confidence": confidence,
    }


# Fractions of m guessed on by the default grid of one_run_audit_search (half "in", half "out").
_DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def default_audit_grid(m: int) -> list[tuple[int, int]]:
    """The fixed grid of (k_plus, k_minus) that :func:`one_run_audit_search` tries by default.

    Depends on ``m`` only: symmetric pairs ``k_plus = k_minus = max(1, round(f m / 2))`` for
    ``f`` in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0), capped at ``m // 2``, duplicates removed (order kept).
    """
    m = _require_int("m", m, minimum=2)
    grid: list[tuple[int, int]] = []
    for f in _DEFAULT_GUESS_FRACTIONS:
        k = min(m // 2, max(1, round(f * m / 2)))
        if (k, k) not in grid:
            grid.append((k, k))
    return grid


def one_run_audit_search(
    *,
    scores: Any,
    included: Any,
    delta: float,
    confidence: float = 0.95,
    grid: Sequence[tuple[int, int]] | None = None,
    tie_rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """One-run audit over a fixed grid of (k_plus, k_minus), corrected for the choice (Bonferroni).

    Each of the ``G = len(grid)`` audits of :func:`one_run_audit` is run at the per-choice
    confidence ``1 - (1 - confidence) / G``. Under the null, the probability that *any* of the G
    bounds exceeds the true epsilon is at most ``G (1 - confidence) / G = 1 - confidence`` (union
    bound), so the maximum over the grid is a valid lower bound at ``confidence``. The price is a
    lower ceiling for every choice. The grid itself must not depend on the scores; the default is
    :func:`default_audit_grid` (a function of ``m`` alone). With ``tie_rng`` ties are broken by a
    fresh random order for each choice, which is harmless: tie breaking only needs to be
    independent of the inclusion bits.

    Returns:
        dict with ``epsilon_lower_bound`` (the best corrected bound), ``best`` (the
        :func:`one_run_audit` result that reached it; the first on ties), ``n_choices``,
        ``per_choice_confidence``, ``confidence`` and ``results`` (one dict per grid entry).
    """
    s, bits = _scores_labels(scores, included, labels_name="included")
    confidence = _require_confidence(confidence)
    if grid is None:
        grid = default_audit_grid(int(s.size))
    grid = list(grid)
    if not grid:
        raise ValueError("grid must contain at least one (k_plus, k_minus) pair; got an empty grid")
    per_choice = 1.0 - (1.0 - confidence) / len(grid)
    results = []
    for entry in grid:
        try:
            k_plus, k_minus = entry
        except (TypeError, ValueError):
            raise ValueError(f"grid entries must be (k_plus, k_minus) pairs; got {entry!r}") from None
        results.append(
            one_run_audit(
                scores=s,
                included=bits,
                k_plus=k_plus,
                k_minus=k_minus,
                delta=delta,
                confidence=per_choice,
                tie_rng=tie_rng,
            )
        )
    best = max(results, key=lambda res: res["epsilon_lower_bound"])
    return {
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "best": best,
        "n_choices": len(grid),
        "per_choice_confidence": per_choice,
        "confidence": confidence,
        "results": results,
    }


# --------------------------------------------------------------------------------------------
# Clopper-Pearson and the hypothesis-testing bound (Jagielski, Ullman & Oprea 2020)
# --------------------------------------------------------------------------------------------


def _check_counts(successes: Any, trials: Any, s_name: str = "successes", n_name: str = "trials") -> tuple[int, int]:
    n = _require_int(n_name, trials, minimum=1)
    k = _require_int(s_name, successes, minimum=0)
    if k > n:
        raise ValueError(f"{s_name} must be <= {n_name} = {n}; got {k}")
    return k, n


def clopper_pearson(*, successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval for a binomial proportion.

    Clopper & Pearson, Biometrika 26(4), 1934: with ``a = 1 - confidence``,
    ``low = Beta^-1(a/2; k, n-k+1)`` (0 when ``k = 0``) and ``high = Beta^-1(1-a/2; k+1, n-k)``
    (1 when ``k = n``). Matches ``scipy.stats.binomtest(k, n).proportion_ci(method='exact')``.
    """
    k, n = _check_counts(successes, trials)
    confidence = _require_confidence(confidence)
    a = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(a / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1.0 - a / 2.0, k + 1, n - k))
    return low, high


def clopper_pearson_upper(*, successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided exact upper confidence bound for a binomial proportion (Clopper & Pearson 1934).

    ``Beta^-1(confidence; k+1, n-k)``, 1 when ``k = n``; for ``k = 0`` this is
    ``1 - (1 - confidence)^(1/n)``. Matches
    ``scipy.stats.binomtest(k, n, alternative='less').proportion_ci(confidence).high``.
    """
    k, n = _check_counts(successes, trials)
    confidence = _require_confidence(confidence)
    return 1.0 if k == n else float(stats.beta.ppf(confidence, k + 1, n - k))


def epsilon_lower_bound_from_rates(
    *, fp: int, n_neg: int, fn: int, n_pos: int, delta: float, confidence: float = 0.95
) -> float:
    """Epsilon lower bound from a membership test's error counts, with Clopper-Pearson upper bounds.

    (epsilon, delta)-DP forces every test of "member" vs "non-member" to satisfy
    ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh & Viswanath,
    ICML 2015, Theorem 2.1); Jagielski, Ullman & Oprea (NeurIPS 2020, arXiv 2006.07709, Sec. 4)
    audit with::

        eps >= max(log((1 - delta - FPR_up) / FNR_up), log((1 - delta - FNR_up) / FPR_up), 0)

    where ``FPR_up``, ``FNR_up`` are one-sided Clopper-Pearson upper bounds. Each is taken at
    level ``1 - (1 - confidence)/2`` (equivalently, the upper end of a two-sided interval at
    ``confidence``), so both hold together with probability >= ``confidence`` (union bound) and
    the returned value is a lower bound on the true epsilon at that confidence. The test (its
    threshold) must be fixed independently of the counts used here.

    Args:
        fp: non-members called members, out of ``n_neg`` (>= 1) non-member trials.
        fn: members called non-members, out of ``n_pos`` (>= 1) member trials.
        delta: delta of the claimed guarantee, in [0, 1).
        confidence: joint confidence level in (0, 1).
    """
    fp, n_neg = _check_counts(fp, n_neg, "fp", "n_neg")
    fn, n_pos = _check_counts(fn, n_pos, "fn", "n_pos")
    delta = _require_real("delta", delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1); got {delta!r}")
    confidence = _require_confidence(confidence)
    each = 1.0 - (1.0 - confidence) / 2.0
    fpr_up = clopper_pearson_upper(successes=fp, trials=n_neg, confidence=each)
    fnr_up = clopper_pearson_upper(successes=fn, trials=n_pos, confidence=each)
    best = 0.0
    for num, den in ((1.0 - delta - fpr_up, fnr_up), (1.0 - delta - fnr_up, fpr_up)):
        if num > 0.0 and den > 0.0:
            best = max(best, math.log(num / den))
    return best


# --------------------------------------------------------------------------------------------
# ROC, AUC, TPR at fixed FPR
# --------------------------------------------------------------------------------------------


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical ROC curve of the test "member iff score >= threshold".

    Labels: 1 (or True) = member; a higher score means "more likely a member". One point per
    distinct score (tied scores move together, so the curve has a diagonal segment through a
    tie), plus the point (0, 0) at threshold ``+inf``. Thresholds decrease; ``fpr`` and ``tpr``
    do not decrease; the last point is (1, 1) at the smallest score.

    Returns:
        (fpr, tpr, thresholds), three float arrays of equal length.
    """
    s, y = _scores_labels(scores, labels)
    n_pos, n_neg = _require_both_classes(y)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # index of the last element of each run of equal scores
    last = np.flatnonzero(np.diff(s_sorted) != 0.0)
    last = np.append(last, s.size - 1)
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    fpr = np.concatenate(([0.0], fps / n_neg))
    tpr = np.concatenate(([0.0], tps / n_pos))
    thresholds = np.concatenate(([np.inf], s_sorted[last]))
    return fpr, tpr, thresholds


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, ``P[S_member > S_non-member] + 0.5 P[S_member = S_non-member]``.

    The Mann-Whitney U statistic over ``n_pos n_neg`` (Mann & Whitney 1947; Hanley & McNeil 1982):
    ``(sum of members' mid-ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``; equal to the
    trapezoidal area under :func:`roc_curve`.
    """
    s, y = _scores_labels(scores, labels)
    n_pos, n_neg = _require_both_classes(y)
    ranks = stats.rankdata(s, method="average")
    u = float(np.sum(ranks[y])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def tpr_at_fpr(scores: Any, labels: Any, fpr_target: float, *, confidence: float = 0.95) -> dict[str, Any]:
    """TPR of the best empirical threshold whose FPR is at most ``fpr_target`` (Carlini et al. 2022, arXiv 2112.03570).

    Among the thresholds of :func:`roc_curve` with empirical FPR <= ``fpr_target``, the one with
    the largest TPR (if several reach it, the highest threshold, which has the lowest FPR). ``tpr_low``/``tpr_high`` are the two-sided
    Clopper-Pearson interval at ``confidence`` for the member count at that threshold. The interval
    treats the threshold as fixed; since it was chosen on the same data, the TPR (and the achieved
    FPR) are optimistic, which the interval does not account for.

    Returns:
        dict with ``tpr``, ``tpr_low``, ``tpr_high``, ``threshold`` (``inf`` when no canary can be
        called a member), ``fpr_achieved``, ``true_positives``, ``false_positives``, ``n_pos``, ``n_neg``.
    """
    fpr_target = _require_in_closed("fpr_target", fpr_target, 0.0, 1.0)
    confidence = _require_confidence(confidence)
    _, y = _scores_labels(scores, labels)
    n_pos, n_neg = _require_both_classes(y)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    last_feasible = int(np.flatnonzero(fpr <= fpr_target)[-1])  # fpr[0] = 0, so never empty
    # tpr does not decrease along the curve: the first point reaching the best feasible TPR is the
    # highest threshold (and lowest FPR) achieving it
    i = int(np.flatnonzero(tpr == tpr[last_feasible])[0])
    tp = int(round(tpr[i] * n_pos))
    fp = int(round(fpr[i] * n_neg))
    low, high = clopper_pearson(successes=tp, trials=n_pos, confidence=confidence)
    return {
        "tpr": float(tpr[i]),
        "tpr_low": low,
        "tpr_high": high,
        "threshold": float(thresholds[i]),
        "fpr_achieved": float(fpr[i]),
        "true_positives": tp,
        "false_positives": fp,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def bootstrap_auc_ci(
    scores: Any, labels: Any, *, rng: np.random.Generator, n_boot: int = 1000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval for the AUC (Efron & Tibshirani 1993, ch. 13).

    Stratified: members and non-members are resampled with replacement separately, keeping both
    counts fixed, so every replicate has both classes. Approximate, unlike Clopper-Pearson.
    """
    s, y = _scores_labels(scores, labels)
    _require_both_classes(y)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    n_boot = _require_int("n_boot", n_boot, minimum=1)
    confidence = _require_confidence(confidence)
    pos = s[y]
    neg = s[~y]
    labels_boot = np.concatenate((np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)))
    values = np.empty(n_boot)
    for b in range(n_boot):
        sample = np.concatenate((rng.choice(pos, size=pos.size), rng.choice(neg, size=neg.size)))
        values[b] = auc(sample, labels_boot)
    a = 1.0 - confidence
    low, high = np.quantile(values, [a / 2.0, 1.0 - a / 2.0])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# Gaussian differential privacy (Dong, Roth & Su 2019): estimates, not bounds
# --------------------------------------------------------------------------------------------


def gdp_mu_from_rates(*, fpr: float, fnr: float) -> float:
    """Point estimate of the GDP parameter mu from one (FPR, FNR) pair. An estimate, not a bound.

    Dong, Roth & Su, "Gaussian Differential Privacy", arXiv 1905.02383, Definition 2.7: the
    mu-GDP trade-off curve is ``FNR = Phi(Phi^-1(1 - FPR) - mu)``, so the mu whose curve passes
    through the observed point is ``mu = Phi^-1(1 - FPR) - Phi^-1(FNR)``. Computed as
    ``-Phi^-1(FPR) - Phi^-1(FNR)`` for precision at small rates.

    ``+inf`` when one rate is 0 and the other below 1; 0 for the trivial corners (0, 1) and (1, 0);
    negative when the test does worse than chance (``FPR + FNR > 1``). The rates are plug-in
    estimates: no confidence is attached, and choosing the threshold on the same data biases mu up.
    """
    fpr = _require_in_closed("fpr", fpr, 0.0, 1.0)
    fnr = _require_in_closed("fnr", fnr, 0.0, 1.0)
    if (fpr == 0.0 and fnr == 1.0) or (fpr == 1.0 and fnr == 0.0):
        return 0.0
    return float(-special.ndtri(fpr) - special.ndtri(fnr))


def _gdp_log_delta(epsilon: float, mu: float) -> float:
    """log of ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` without cancellation or overflow."""
    a = -epsilon / mu + mu / 2.0
    log_phi_a = float(special.log_ndtr(a))
    if log_phi_a == -math.inf:
        return -math.inf
    d = epsilon + float(special.log_ndtr(a - mu)) - log_phi_a  # log of the ratio of the two terms, <= 0
    if d >= 0.0:  # only through rounding, when the two terms agree to machine precision
        return -math.inf
    return log_phi_a + math.log(-math.expm1(d))


def gdp_delta(*, epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (Dong, Roth & Su 2019, arXiv 1905.02383, Corollary 2.13).

    ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``; the same curve as the analytic
    Gaussian mechanism with ``mu = sensitivity / sigma`` (Balle & Wang 2018, Theorem 8).
    """
    epsilon = _require_epsilon(epsilon)
    mu = _require_real("mu", mu)
    if not mu >= 0.0:
        raise ValueError(f"mu must be >= 0; got {mu!r}")
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    return math.exp(_gdp_log_delta(epsilon, mu))


def gdp_epsilon(*, mu: float, delta: float) -> float:
    """Smallest epsilon with a mu-GDP mechanism (epsilon, delta)-DP. An estimate when mu is estimated.

    Solves ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` for epsilon
    (Dong, Roth & Su 2019, arXiv 1905.02383, Corollary 2.13); the right side decreases in epsilon,
    so Brent's method on its logarithm finds the unique root. Returns 0 when
    ``delta >= 2 Phi(mu/2) - 1`` (already (0, delta)-DP) and ``inf`` for ``mu = inf``.
    """
    mu = _require_real("mu", mu)
    if not mu >= 0.0:
        raise ValueError(f"mu must be >= 0; got {mu!r}")
    delta = _require_real("delta", delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in the open interval (0, 1); got {delta!r}")
    if math.isinf(mu):
        return math.inf
    if mu == 0.0:
        return 0.0
    log_target = math.log(delta)
    if _gdp_log_delta(0.0, mu) <= log_target:
        return 0.0
    hi = max(1.0, mu * mu)
    while _gdp_log_delta(hi, mu) > log_target:
        hi *= 2.0
    return float(optimize.brentq(lambda e: _gdp_log_delta(e, mu) - log_target, 0.0, hi, xtol=1e-12, rtol=1e-14))


def gdp_mu_from_epsilon(*, epsilon: float, delta: float) -> float:
    """The mu for which mu-GDP is exactly (epsilon, delta)-DP at this epsilon: the inverse of :func:`gdp_epsilon`.

    Solves Corollary 2.13 of Dong, Roth & Su 2019 (arXiv 1905.02383) for mu; the right side
    increases in mu. ``sensitivity / mu`` is the sigma of the analytic Gaussian mechanism for
    (epsilon, delta) (Balle & Wang, ICML 2018, arXiv 1805.06530, Theorem 8 and Algorithm 1).
    """
    epsilon = _require_epsilon(epsilon)
    delta = _require_real("delta", delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in the open interval (0, 1); got {delta!r}")
    if epsilon == 0.0:  # delta = 2 Phi(mu/2) - 1
        return float(2.0 * special.ndtri((1.0 + delta) / 2.0))
    log_target = math.log(delta)
    hi = 1.0
    while _gdp_log_delta(epsilon, hi) < log_target:
        hi *= 2.0
    lo = hi / 2.0
    while _gdp_log_delta(epsilon, lo) > log_target:
        lo /= 2.0
    return float(optimize.brentq(lambda mu: _gdp_log_delta(epsilon, mu) - log_target, lo, hi, xtol=1e-14, rtol=1e-14))
