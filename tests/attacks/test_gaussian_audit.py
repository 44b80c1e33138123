"""The auditor is audited: bounds on mechanisms whose epsilon is known, and a planted leak."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from attacks import metrics as mt

EPS, DELTA = 2.0, 1e-5
M = 5000
K = 100  # fixed before any score is seen


def _analytic_gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest sigma with N(0, sigma^2) noise (eps, delta)-DP: Balle & Wang 2018, Theorem 8.

    Written out here with plain scipy.stats.norm, independently of attacks.metrics.
    """

    def excess(sigma):
        a = sensitivity / (2 * sigma)
        b = eps * sigma / sensitivity
        return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b) - delta

    return optimize.brentq(excess, 1e-3, 100.0, xtol=1e-14, rtol=1e-14)


SIGMA = _analytic_gaussian_sigma(EPS, DELTA)


def _canaries(seed: int):
    rng = np.random.default_rng(seed)
    included = rng.random(M) < 0.5
    return rng, included


def test_sigma_agrees_with_gdp_inverse():
    assert SIGMA == pytest.approx(1.0 / mt.gdp_mu_from_epsilon(epsilon=EPS, delta=DELTA), rel=1e-9)
    assert SIGMA == pytest.approx(1.99382, abs=1e-4)


@pytest.mark.parametrize("seed, pinned", [(0, 0.9953), (1, 0.9418), (2, 1.0503), (3, 1.0503)])
def test_gaussian_mechanism_audit_is_below_true_epsilon(seed, pinned):
    rng, included = _canaries(seed)
    scores = included * 1.0 + rng.normal(0.0, SIGMA, size=M)  # sensitivity 1 per canary
    res = mt.one_run_audit(scores=scores, included=included, k_plus=K, k_minus=K, delta=DELTA)
    assert res["r"] == 2 * K
    assert 0.5 < res["epsilon_lower_bound"] <= EPS
    assert res["epsilon_lower_bound"] == pytest.approx(pinned, abs=1e-3)
    # the audit at the true epsilon is not rejected
    assert mt.one_run_p_value(epsilon=EPS, delta=DELTA, m=M, r=res["r"], v=res["v"]) >= 0.05


def test_randomised_response_audit_is_valid_and_nearly_tight():
    """Pure eps-DP randomised response, guessing on every canary: the one-run bound is nearly exact here.

    Over 200 seeds at 95% confidence, at most a binomial(200, 0.05) share may exceed the true
    epsilon (P[more than 18] < 1%); the mean shows the audit has power.
    """
    flip_prob = 1.0 / (1.0 + math.exp(EPS))
    bounds = []
    for seed in range(200):
        rng, included = _canaries(seed)
        released = included ^ (rng.random(M) < flip_prob)
        scores = released + 0.5 * rng.random(M)  # independent jitter: no ties, still eps-DP
        res = mt.one_run_audit(scores=scores, included=included, k_plus=M // 2, k_minus=M // 2, delta=0.0)
        bounds.append(res["epsilon_lower_bound"])
    bounds = np.array(bounds)
    assert np.sum(bounds > EPS) <= 18
    assert bounds.mean() > 1.8


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_leak_reaches_the_ceiling(seed):
    rng, included = _canaries(seed)
    scores = included + 0.5 * rng.random(M)  # noise that never crosses: a perfect attack
    res = mt.one_run_audit(scores=scores, included=included, k_plus=K, k_minus=K, delta=DELTA)
    assert (res["r"], res["v"]) == (2 * K, 2 * K)
    assert res["epsilon_lower_bound"] == res["ceiling"]
    assert res["ceiling"] == pytest.approx(4.0555, abs=1e-3)
    assert res["ceiling"] > 2 * EPS - 0.5  # far above what the honest mechanism showed

    # exactly tied scores: the default abstains at the boundary, random tie breaking does not
    tied = included * 1.0
    assert mt.one_run_audit(scores=tied, included=included, k_plus=K, k_minus=K, delta=DELTA)["r"] == 0
    res = mt.one_run_audit(
        scores=tied, included=included, k_plus=K, k_minus=K, delta=DELTA, tie_rng=np.random.default_rng(seed)
    )
    assert res["epsilon_lower_bound"] == res["ceiling"] == pytest.approx(4.0555, abs=1e-3)


def test_search_over_grid_stays_below_true_epsilon():
    for seed in range(3):
        rng, included = _canaries(seed)
        scores = included * 1.0 + rng.normal(0.0, SIGMA, size=M)
        res = mt.one_run_audit_search(scores=scores, included=included, delta=DELTA)
        assert res["n_choices"] == 6
        assert 0.5 < res["epsilon_lower_bound"] <= EPS


def test_threshold_test_bound_on_gaussian_mechanism():
    """Jagielski-style bound: fixed threshold, many independent runs of the Gaussian mechanism."""
    rng = np.random.default_rng(11)
    n = 20_000
    out_runs = rng.normal(0.0, SIGMA, size=n)  # non-member: mechanism on 0
    in_runs = 1.0 + rng.normal(0.0, SIGMA, size=n)  # member: mechanism on 1
    threshold = 4.0  # fixed in advance, far in the tail, where (eps, delta) is nearly tight
    fp = int(np.sum(out_runs >= threshold))
    fn = int(np.sum(in_runs < threshold))
    bound = mt.epsilon_lower_bound_from_rates(fp=fp, n_neg=n, fn=fn, n_pos=n, delta=DELTA)
    assert 0.0 < bound <= EPS
