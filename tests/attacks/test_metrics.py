"""Tests of attacks.metrics against closed forms, scipy and slow obvious twins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from attacks import metrics as mt

# --------------------------------------------------------------------------------------------
# One-run p-value
# --------------------------------------------------------------------------------------------


def _q(eps: float) -> float:
    return 1.0 / (1.0 + math.exp(-eps))


def _p_value_direct(*, epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """Theorem 3.1 of arXiv 2305.08846 term by term, with the max over the full range 1 <= i <= m."""
    q = _q(epsilon)
    pmf = [math.comb(r, k) * q**k * (1.0 - q) ** (r - k) for k in range(r + 1)]

    def f(x: int) -> float:  # P[Bin(r, q) >= x]
        return sum(pmf[max(x, 0) :])

    beta = f(v)
    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, beta + 2.0 * m * delta * alpha)


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 2.5, 6.0])
def test_p_value_pure_dp_all_correct_is_q_to_the_r(eps):
    # delta = 0, r = v = 4: p = P[Bin(4, q) >= 4] = q^4
    assert mt.one_run_p_value(epsilon=eps, delta=0.0, m=10, r=4, v=4) == pytest.approx(_q(eps) ** 4, rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.7, 2.0])
def test_p_value_hand_case_with_delta(eps):
    # r = v = 2: beta = q^2; alpha = max(P[W = 1] / 1, P[W in {0, 1}] / 2)
    q = _q(eps)
    m, delta = 10, 0.01
    alpha = max(2 * q * (1 - q), (1 - q**2) / 2)
    expected = min(1.0, q**2 + 2 * m * delta * alpha)
    assert mt.one_run_p_value(epsilon=eps, delta=delta, m=m, r=2, v=2) == pytest.approx(expected, rel=1e-12)


def test_p_value_matches_direct_sum_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(60):
        m = int(rng.integers(1, 80))
        r = int(rng.integers(0, min(m, 50) + 1))
        v = int(rng.integers(0, r + 1))
        eps = float(rng.uniform(0, 6))
        delta = float(rng.choice([0.0, 1e-6, 1e-3, 1e-2]))
        got = mt.one_run_p_value(epsilon=eps, delta=delta, m=m, r=r, v=v)
        want = _p_value_direct(epsilon=eps, delta=delta, m=m, r=r, v=v)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (m, r, v, eps, delta)


@pytest.mark.parametrize(
    "m, r, v, delta",
    [
        (1000, 100, 100, 1e-5),
        (1000, 100, 90, 1e-5),
        (1000, 1000, 1000, 1e-5),
        (1000, 1000, 700, 1e-5),
        (10**6, 1000, 990, 1e-5),
        (10**5, 10**4, 9000, 1e-6),
        (100, 50, 45, 1e-2),
        (20, 20, 15, 0.0),
    ],
)
def test_p_value_monotone_in_epsilon(m, r, v, delta):
    eps = np.linspace(0.0, 12.0, 241)
    p = np.array([mt.one_run_p_value(epsilon=e, delta=delta, m=m, r=r, v=v) for e in eps])
    assert np.all(np.diff(p) >= -1e-12)
    assert p[-1] > p[0]  # not constant: the test is not vacuous


def test_p_value_edges():
    assert mt.one_run_p_value(epsilon=3.0, delta=1e-5, m=10, r=0, v=0) == 1.0
    assert mt.one_run_p_value(epsilon=3.0, delta=1e-5, m=10, r=5, v=0) == 1.0
    # epsilon so large that q == 1.0 in double precision
    assert mt.one_run_p_value(epsilon=60.0, delta=0.0, m=100, r=50, v=40) == 1.0
    # large r stays finite and in [0, 1]
    p = mt.one_run_p_value(epsilon=1.0, delta=1e-6, m=10**6, r=10**5, v=80_000)
    assert 0.0 <= p <= 1.0


# --------------------------------------------------------------------------------------------
# Epsilon lower bound and ceiling: the REFERENCE.md values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r, v, reference, pinned",
    [
        (100, 100, 3.47, 3.46538),
        (1000, 1000, 5.78, 5.78228),
        (100, 90, 1.63, 1.62614),
    ],
)
def test_reference_lower_bounds(r, v, reference, pinned):
    lb = mt.one_run_epsilon_lower_bound(m=1000, r=r, v=v, delta=1e-5, confidence=0.95)
    assert lb == pytest.approx(reference, abs=0.02)
    assert lb == pytest.approx(pinned, abs=1e-4)


def test_reference_ceilings():
    assert mt.one_run_ceiling(m=1000, r=100, delta=1e-5) == pytest.approx(3.47, abs=0.02)
    assert mt.one_run_ceiling(m=1000, r=1000, delta=1e-5) == pytest.approx(5.78, abs=0.02)


@pytest.mark.parametrize("m, r, v, delta, conf", [(1000, 100, 90, 1e-5, 0.95), (5000, 200, 157, 1e-5, 0.95), (50, 40, 38, 0.0, 0.99)])
def test_lower_bound_is_the_crossing(m, r, v, delta, conf):
    lb = mt.one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=conf)
    level = 1.0 - conf
    assert lb > 0.0
    assert mt.one_run_p_value(epsilon=lb, delta=delta, m=m, r=r, v=v) < level
    assert mt.one_run_p_value(epsilon=lb + 1e-5, delta=delta, m=m, r=r, v=v) >= level


def test_lower_bound_zero_when_not_rejected():
    assert mt.one_run_epsilon_lower_bound(m=10, r=1, v=1, delta=0.0) == 0.0  # p(0) = 1/2
    assert mt.one_run_epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0
    assert mt.one_run_epsilon_lower_bound(m=1000, r=0, v=0, delta=1e-5) == 0.0


def test_ceiling_grows_with_guesses_and_shrinks_with_confidence():
    c = [mt.one_run_ceiling(m=10_000, r=r, delta=1e-5) for r in (10, 100, 1000, 10_000)]
    assert all(a < b for a, b in zip(c, c[1:]))
    assert mt.one_run_ceiling(m=1000, r=100, delta=1e-5, confidence=0.99) < mt.one_run_ceiling(
        m=1000, r=100, delta=1e-5, confidence=0.95
    )
    # more canaries at the same r: 2 m delta grows, the ceiling drops
    assert mt.one_run_ceiling(m=10**5, r=100, delta=1e-5) < mt.one_run_ceiling(m=1000, r=100, delta=1e-5)


# --------------------------------------------------------------------------------------------
# One-run audit: guessing and counting
# --------------------------------------------------------------------------------------------


def test_audit_counts_by_hand():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [1, 1, 0, 0, 1, 0]
    res = mt.one_run_audit(scores=scores, included=included, k_plus=2, k_minus=2, delta=1e-5)
    # "in": scores 5, 4 (both members); "out": scores 1 (member, wrong), 0 (non-member, right)
    assert (res["n_guess_in"], res["n_guess_out"], res["r"]) == (2, 2, 4)
    assert (res["n_correct_in"], res["n_correct_out"], res["v"]) == (2, 1, 3)
    assert res["accuracy"] == 0.75
    assert res["epsilon_lower_bound"] == mt.one_run_epsilon_lower_bound(m=6, r=4, v=3, delta=1e-5)
    assert res["ceiling"] == mt.one_run_ceiling(m=6, r=4, delta=1e-5)


def test_audit_guess_counts_do_not_depend_on_canary_order():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=300)
    bits = rng.random(300) < 0.5
    a = mt.one_run_audit(scores=scores, included=bits, k_plus=30, k_minus=20, delta=1e-5)
    perm = rng.permutation(300)
    b = mt.one_run_audit(scores=scores[perm], included=bits[perm], k_plus=30, k_minus=20, delta=1e-5)
    assert a == b


def test_audit_ties_at_the_boundary_are_abstained_on():
    scores = [3.0, 2.0, 2.0, 1.0, 0.0, 0.0]
    included = [1, 1, 0, 0, 1, 0]
    res = mt.one_run_audit(scores=scores, included=included, k_plus=2, k_minus=1, delta=0.0)
    # top 2 would need to split the tie at 2.0; bottom 1 would split the tie at 0.0
    assert (res["n_guess_in"], res["n_guess_out"], res["n_abstained_ties"]) == (1, 0, 2)
    assert (res["r"], res["v"]) == (1, 1)
    # no tie at the boundary: exactly k guesses
    res = mt.one_run_audit(scores=scores, included=included, k_plus=3, k_minus=2, delta=0.0)
    assert (res["n_guess_in"], res["n_guess_out"], res["n_abstained_ties"]) == (3, 2, 0)


def test_audit_ties_broken_by_rng_make_exactly_k_guesses():
    scores = np.repeat([0.0, 1.0], 50)
    included = np.repeat([0, 1], 50)
    res = mt.one_run_audit(
        scores=scores, included=included, k_plus=10, k_minus=10, delta=0.0, tie_rng=np.random.default_rng(0)
    )
    assert (res["r"], res["v"]) == (20, 20)


def test_audit_all_guesses():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=40)
    bits = rng.random(40) < 0.5
    res = mt.one_run_audit(scores=scores, included=bits, k_plus=40, k_minus=0, delta=0.0)
    assert (res["r"], res["v"]) == (40, int(bits.sum()))
    res = mt.one_run_audit(scores=scores, included=bits, k_plus=0, k_minus=40, delta=0.0)
    assert (res["r"], res["v"]) == (40, int((~bits).sum()))
    res = mt.one_run_audit(scores=scores, included=bits, k_plus=0, k_minus=0, delta=0.0)
    assert (res["r"], res["epsilon_lower_bound"]) == (0, 0.0)
    assert math.isnan(res["accuracy"])


def test_audit_search_grid_and_bonferroni():
    assert mt.default_audit_grid(5000) == [(50, 50), (125, 125), (250, 250), (500, 500), (1250, 1250), (2500, 2500)]
    assert mt.default_audit_grid(10) == [(1, 1), (2, 2), (5, 5)]
    rng = np.random.default_rng(3)
    bits = rng.random(1000) < 0.5
    scores = bits + 0.5 * rng.random(1000)  # separable: every guess right
    res = mt.one_run_audit_search(scores=scores, included=bits, delta=1e-5, grid=[(10, 10), (50, 50)])
    assert res["n_choices"] == 2
    assert res["per_choice_confidence"] == pytest.approx(0.975)
    assert res["best"]["k_plus"] == 50
    corrected = mt.one_run_ceiling(m=1000, r=100, delta=1e-5, confidence=0.975)
    assert res["epsilon_lower_bound"] == corrected
    assert corrected < mt.one_run_ceiling(m=1000, r=100, delta=1e-5, confidence=0.95)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-1.0, delta=0.0, m=10, r=5, v=5), "epsilon"),
        (dict(epsilon=math.inf, delta=0.0, m=10, r=5, v=5), "epsilon"),
        (dict(epsilon=1.0, delta=1.5, m=10, r=5, v=5), "delta"),
        (dict(epsilon=1.0, delta=0.0, m=0, r=0, v=0), "m"),
        (dict(epsilon=1.0, delta=0.0, m=10, r=11, v=5), "r must satisfy r <= m"),
        (dict(epsilon=1.0, delta=0.0, m=10, r=5, v=6), "v must satisfy v <= r"),
        (dict(epsilon=1.0, delta=0.0, m=10, r=5.0, v=5), "r must be an integer"),
        (dict(epsilon=1.0, delta=0.0, m=True, r=1, v=1), "m must be an integer"),
    ],
)
def test_p_value_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mt.one_run_p_value(**kwargs)


def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match="confidence"):
        mt.one_run_epsilon_lower_bound(m=10, r=5, v=5, delta=0.0, confidence=1.0)
    with pytest.raises(ValueError, match="k_plus \\+ k_minus"):
        mt.one_run_audit(scores=[1.0, 2.0], included=[0, 1], k_plus=2, k_minus=1, delta=0.0)
    with pytest.raises(ValueError, match="included must be booleans or 0/1"):
        mt.one_run_audit(scores=[1.0, 2.0], included=[0, 2], k_plus=1, k_minus=0, delta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        mt.one_run_audit(scores=[1.0, 2.0], included=[0, 1, 1], k_plus=1, k_minus=0, delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        mt.roc_curve([1.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match="both members"):
        mt.auc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="successes must be <= trials"):
        mt.clopper_pearson(successes=5, trials=4)
    with pytest.raises(ValueError, match="trials"):
        mt.clopper_pearson(successes=0, trials=0)
    with pytest.raises(ValueError, match="fpr_target"):
        mt.tpr_at_fpr([1.0, 2.0], [0, 1], 1.5)
    with pytest.raises(ValueError, match="grid"):
        mt.one_run_audit_search(scores=[1.0, 2.0], included=[0, 1], delta=0.0, grid=[])
    with pytest.raises(ValueError, match="mu must be >= 0"):
        mt.gdp_epsilon(mu=-0.1, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        mt.gdp_mu_from_epsilon(epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="rng"):
        mt.bootstrap_auc_ci([1.0, 2.0], [0, 1], rng=np.random.RandomState(0))


# --------------------------------------------------------------------------------------------
# Clopper-Pearson
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 50, 1000])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy(n, conf):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if not 0 <= k <= n:
            continue
        want = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
        low, high = mt.clopper_pearson(successes=k, trials=n, confidence=conf)
        assert low == pytest.approx(want.low, rel=1e-9, abs=1e-14)
        assert high == pytest.approx(want.high, rel=1e-9, abs=1e-14)
        up = mt.clopper_pearson_upper(successes=k, trials=n, confidence=conf)
        want_up = stats.binomtest(k, n, alternative="less").proportion_ci(confidence_level=conf, method="exact").high
        assert up == pytest.approx(want_up, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("n", [1, 10, 300])
def test_clopper_pearson_edges_closed_form(n):
    a = 0.05
    assert mt.clopper_pearson(successes=0, trials=n) == pytest.approx((0.0, 1 - (a / 2) ** (1 / n)), rel=1e-12)
    assert mt.clopper_pearson(successes=n, trials=n) == pytest.approx(((a / 2) ** (1 / n), 1.0), rel=1e-12)
    assert mt.clopper_pearson_upper(successes=0, trials=n) == pytest.approx(1 - a ** (1 / n), rel=1e-12)
    assert mt.clopper_pearson_upper(successes=n, trials=n) == 1.0


# --------------------------------------------------------------------------------------------
# Jagielski et al. 2020 bound from error counts
# --------------------------------------------------------------------------------------------


def test_epsilon_from_rates_by_hand():
    fp, n_neg, fn, n_pos, delta = 3, 1000, 400, 1000, 1e-5
    each = 0.975
    fpr_up = stats.binomtest(fp, n_neg, alternative="less").proportion_ci(each).high
    fnr_up = stats.binomtest(fn, n_pos, alternative="less").proportion_ci(each).high
    want = max(math.log((1 - delta - fpr_up) / fnr_up), math.log((1 - delta - fnr_up) / fpr_up), 0.0)
    got = mt.epsilon_lower_bound_from_rates(fp=fp, n_neg=n_neg, fn=fn, n_pos=n_pos, delta=delta)
    assert got == pytest.approx(want, rel=1e-10)
    assert got > 3.0  # the second term dominates here: ~log(0.57 / 0.0087)
    # symmetric in swapping the roles of the two error types
    assert mt.epsilon_lower_bound_from_rates(fp=fn, n_neg=n_pos, fn=fp, n_pos=n_neg, delta=delta) == pytest.approx(got)


def test_epsilon_from_rates_edges_and_monotone_in_data():
    # chance-level test: nothing shown
    assert mt.epsilon_lower_bound_from_rates(fp=500, n_neg=1000, fn=500, n_pos=1000, delta=1e-5) == 0.0
    # perfect test: bounded by the sample size, not infinite
    perfect = mt.epsilon_lower_bound_from_rates(fp=0, n_neg=1000, fn=0, n_pos=1000, delta=1e-5)
    assert math.log((1 - 1e-5 - (1 - 0.025 ** (1 / 1000))) / (1 - 0.025 ** (1 / 1000))) == pytest.approx(perfect)
    # same rates, ten times the data: a larger bound
    small = mt.epsilon_lower_bound_from_rates(fp=10, n_neg=1000, fn=300, n_pos=1000, delta=1e-5)
    big = mt.epsilon_lower_bound_from_rates(fp=100, n_neg=10_000, fn=3000, n_pos=10_000, delta=1e-5)
    assert 0.0 < small < big


# --------------------------------------------------------------------------------------------
# ROC, AUC, TPR at fixed FPR against brute force
# --------------------------------------------------------------------------------------------


def _tied_data(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = rng.integers(0, 15, size=n) + 3 * labels * rng.integers(0, 2, size=n)  # many ties
    return scores.astype(float), labels


def _brute_roc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    thresholds = np.concatenate(([np.inf], np.unique(scores)[::-1]))
    fpr = np.array([np.mean(neg >= t) for t in thresholds])
    tpr = np.array([np.mean(pos >= t) for t in thresholds])
    return fpr, tpr, thresholds


def _brute_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (pos.size * neg.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_threshold_sweep(seed):
    scores, labels = _tied_data(seed)
    fpr, tpr, thr = mt.roc_curve(scores, labels)
    bfpr, btpr, bthr = _brute_roc(scores, labels)
    np.testing.assert_array_equal(thr, bthr)
    np.testing.assert_allclose(fpr, bfpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, btpr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pair_count_and_trapezoid(seed):
    scores, labels = _tied_data(seed)
    a = mt.auc(scores, labels)
    assert a == pytest.approx(_brute_auc(scores, labels), abs=1e-12)
    fpr, tpr, _ = mt.roc_curve(scores, labels)
    assert a == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)
    # boolean labels give the same answer
    assert mt.auc(scores, labels.astype(bool)) == a


def test_auc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert mt.auc([0.0, 1.0, 2.0, 3.0], labels) == 1.0
    assert mt.auc([3.0, 2.0, 1.0, 0.0], labels) == 0.0
    assert mt.auc([1.0, 1.0, 1.0, 1.0], labels) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0])
def test_tpr_at_fpr_matches_brute_force(seed, target):
    scores, labels = _tied_data(seed)
    got = mt.tpr_at_fpr(scores, labels, target)
    bfpr, btpr, bthr = _brute_roc(scores, labels)
    feasible = [i for i in range(bthr.size) if bfpr[i] <= target]
    best = max(feasible, key=lambda i: (btpr[i], -bfpr[i]))
    assert got["tpr"] == pytest.approx(btpr[best], abs=1e-12)
    assert got["fpr_achieved"] == pytest.approx(bfpr[best], abs=1e-12)
    assert got["fpr_achieved"] <= target
    assert got["threshold"] == bthr[best]
    n_pos = int(labels.sum())
    tp = int(np.sum(scores[labels == 1] >= got["threshold"]))
    assert got["true_positives"] == tp
    assert (got["tpr_low"], got["tpr_high"]) == mt.clopper_pearson(successes=tp, trials=n_pos)


def test_tpr_at_fpr_prefers_the_lower_fpr_among_equal_tpr():
    # thresholds 4 and 3 both give TPR 1/2 within FPR <= 1/2; 4 does it with FPR 0
    got = mt.tpr_at_fpr([4.0, 3.0, 2.0, 1.0], [1, 0, 0, 1], 0.5)
    assert (got["tpr"], got["fpr_achieved"], got["threshold"]) == (0.5, 0.0, 4.0)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_tpr_at_fpr_matches_brute_force_on_continuous_scores(target):
    rng = np.random.default_rng(9)
    labels = (rng.random(400) < 0.5).astype(int)
    scores = np.round(rng.normal(size=400) + 0.8 * labels, 1)
    got = mt.tpr_at_fpr(scores, labels, target)
    bfpr, btpr, bthr = _brute_roc(scores, labels)
    best = max((i for i in range(bthr.size) if bfpr[i] <= target), key=lambda i: (btpr[i], -bfpr[i]))
    assert (got["tpr"], got["fpr_achieved"], got["threshold"]) == pytest.approx((btpr[best], bfpr[best], bthr[best]))


def test_bootstrap_auc_ci_reproducible_and_sane():
    scores, labels = _tied_data(5)
    a = mt.bootstrap_auc_ci(scores, labels, rng=np.random.default_rng(7), n_boot=200)
    b = mt.bootstrap_auc_ci(scores, labels, rng=np.random.default_rng(7), n_boot=200)
    assert a == b
    low, high = a
    assert low < mt.auc(scores, labels) < high
    assert high - low < 0.3


# --------------------------------------------------------------------------------------------
# Gaussian DP
# --------------------------------------------------------------------------------------------


def _delta_by_integration(eps: float, mu: float) -> float:
    """delta(eps) = integral over {L > eps} of (p - e^eps q) for P = N(mu, 1), Q = N(0, 1).

    The privacy loss log(p/q)(x) = mu x - mu^2/2 exceeds eps for x > x0; independent of the
    closed form of Corollary 2.13 (Dong, Roth & Su 2019).
    """
    x0 = (eps + mu * mu / 2.0) / mu

    def integrand(x):
        return stats.norm.pdf(x - mu) - math.exp(eps) * stats.norm.pdf(x)

    value, _ = integrate.quad(integrand, x0, x0 + 40.0, epsabs=1e-17, epsrel=1e-12, limit=200)
    return value


def test_gdp_known_value_mu_1():
    eps = mt.gdp_epsilon(mu=1.0, delta=1e-5)
    assert eps == pytest.approx(4.377178, abs=2e-6)
    assert _delta_by_integration(eps, 1.0) == pytest.approx(1e-5, rel=1e-6)
    assert mt.gdp_delta(epsilon=eps, mu=1.0) == pytest.approx(1e-5, rel=1e-9)


# (mu, eps) with delta >= 1e-30: below that the quadrature of p - e^eps q cancels
# catastrophically (mu = 0.3, eps = 5 gives 2.4e-63 with 1% error); the mpmath test covers it.
@pytest.mark.parametrize(
    "mu, eps",
    [(0.3, 0.0), (0.3, 0.5), (0.3, 2.0), (1.0, 0.0), (1.0, 0.5), (1.0, 2.0), (1.0, 5.0)]
    + [(2.5, 0.0), (2.5, 0.5), (2.5, 2.0), (2.5, 5.0)],
)
def test_gdp_delta_matches_integration(mu, eps):
    want = _delta_by_integration(eps, mu) if eps > 0 else 2 * stats.norm.cdf(mu / 2) - 1
    assert want > 1e-30
    assert mt.gdp_delta(epsilon=eps, mu=mu) == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 2.5, 8.0])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0, 5.0, 20.0])
def test_gdp_delta_matches_mpmath(mu, eps):
    mp = pytest.importorskip("mpmath")
    with mp.workdps(60):
        m, e = mp.mpf(mu), mp.mpf(eps)
        want = mp.ncdf(-e / m + m / 2) - mp.exp(e) * mp.ncdf(-e / m - m / 2)
    got = mt.gdp_delta(epsilon=eps, mu=mu)
    if want < mp.mpf("1e-300"):
        assert got < 1e-290
    else:
        assert got == pytest.approx(float(want), rel=1e-9)


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8, 1e-12])
def test_gdp_round_trip(eps, delta):
    mu = mt.gdp_mu_from_epsilon(epsilon=eps, delta=delta)
    assert mu > 0
    assert mt.gdp_epsilon(mu=mu, delta=delta) == pytest.approx(eps, rel=1e-8, abs=1e-9)
    assert mt.gdp_delta(epsilon=eps, mu=mu) == pytest.approx(delta, rel=1e-8)


def test_gdp_monotone_and_edges():
    eps = [mt.gdp_epsilon(mu=mu, delta=1e-5) for mu in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert mt.gdp_epsilon(mu=0.0, delta=1e-5) == 0.0
    assert mt.gdp_epsilon(mu=math.inf, delta=1e-5) == math.inf
    # delta above 2 Phi(mu/2) - 1: already (0, delta)-DP
    assert mt.gdp_epsilon(mu=0.1, delta=0.1) == 0.0
    mu0 = mt.gdp_mu_from_epsilon(epsilon=0.0, delta=0.01)
    assert 2 * stats.norm.cdf(mu0 / 2) - 1 == pytest.approx(0.01, rel=1e-10)


def test_gdp_mu_from_rates():
    mu = 1.3
    rate = stats.norm.cdf(-mu / 2)  # the symmetric point of the mu-GDP trade-off curve
    assert mt.gdp_mu_from_rates(fpr=rate, fnr=rate) == pytest.approx(mu, rel=1e-12)
    fpr = 0.01
    fnr = stats.norm.cdf(stats.norm.ppf(1 - fpr) - mu)
    assert mt.gdp_mu_from_rates(fpr=fpr, fnr=fnr) == pytest.approx(mu, rel=1e-10)
    assert mt.gdp_mu_from_rates(fpr=0.5, fnr=0.5) == 0.0
    assert mt.gdp_mu_from_rates(fpr=0.7, fnr=0.6) < 0.0
    assert mt.gdp_mu_from_rates(fpr=0.0, fnr=0.3) == math.inf
    assert mt.gdp_mu_from_rates(fpr=0.0, fnr=1.0) == 0.0
    assert mt.gdp_mu_from_rates(fpr=1.0, fnr=0.0) == 0.0
