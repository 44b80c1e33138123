"""Skellam RDP bounds against exact Rényi divergences computed numerically, hand values and the Gaussian limit."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import special

from accounting import rdp, skellam
from accounting.errors import AccountingInputError
from accounting.events import PoissonGaussianEvent


# -- the slow obvious twin: exact divergences on a truncated integer support ----------------------
def _poisson_logpmf(k: np.ndarray, lam: float) -> np.ndarray:
    return k * math.log(lam) - lam - special.gammaln(k + 1.0)


@functools.cache
def _logpmf_table(mu: float, half: int) -> np.ndarray:
    """log P(Sk(mu) = k) for k = 0..half: the convolution sum_j Pois(j + k) Pois(j), lam = mu / 2, in log space."""
    lam = mu / 2.0
    j = np.arange(int(lam + 40.0 * math.sqrt(lam) + 40.0) + 1, dtype=float)  # Pois(lam) mass beyond: < e^-700
    k = np.arange(half + 1, dtype=float)
    return special.logsumexp(_poisson_logpmf(j[None, :] + k[:, None], lam) + _poisson_logpmf(j, lam)[None, :], axis=1)


def skellam_logpmf(ks: np.ndarray, mu: float) -> np.ndarray:
    """log P(Sk(mu) = k), Sk(mu) = Poisson(mu/2) - Poisson(mu/2) (symmetric in k)."""
    k = np.abs(np.asarray(ks, dtype=np.int64))
    half = int(k.max())
    half = 1 << max(half - 1, 1).bit_length()  # a few table sizes per mu, shared through the cache
    return _logpmf_table(float(mu), half)[k]


def support(mu: float, shift: int, alpha: int) -> np.ndarray:
    """Integers where the tilted terms p(k-s)^alpha p(k)^(1-alpha) live (a bump near alpha*s of width ~sqrt(mu))."""
    half = int(30.0 * math.sqrt(mu) + 4 * alpha * abs(shift) + 60)
    return np.arange(-half, half + 1)


def exact_divergence(mu: float, shift: int, alpha: int) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)), summed over the support (edge terms checked negligible)."""
    k = support(mu, shift, alpha)
    terms = alpha * skellam_logpmf(k - shift, mu) + (1 - alpha) * skellam_logpmf(k, mu)
    assert max(terms[0], terms[-1]) < terms.max() - 30.0, "support too narrow"
    return float(special.logsumexp(terms)) / (alpha - 1)


def exact_subsampled_divergence(mu: float, shift: int, alpha: int, q: float) -> float:
    """max of D_alpha(M || P) and D_alpha(P || M), M = (1-q) P + q (P shifted): the add and the remove direction."""
    k = support(mu, shift, alpha)
    lp = skellam_logpmf(k, mu)
    lm = np.logaddexp(math.log1p(-q) + lp, math.log(q) + skellam_logpmf(k - shift, mu))
    forward = special.logsumexp(alpha * lm + (1 - alpha) * lp) / (alpha - 1)
    backward = special.logsumexp(alpha * lp + (1 - alpha) * lm) / (alpha - 1)
    return float(max(forward, backward))


def bound(mu, l2, l1, alphas):
    return skellam.skellam_rdp(mu=mu, l2_sensitivity=l2, l1_sensitivity=l1, orders=np.asarray(alphas, dtype=float))


# -- tests ------------------------------------------------------------------------------------------
def test_convolution_pmf_matches_the_bessel_formula():
    """Two computations of the pmf: exp(-mu) I_k(mu) = ive(k, mu) (the paper's form) and the Poisson convolution."""
    for mu in (0.5, 10.0, 300.0):
        k = np.arange(0, 60)
        np.testing.assert_allclose(skellam_logpmf(k, mu), np.log(special.ive(k, mu)), rtol=1e-10, atol=1e-12)
        total = special.logsumexp(skellam_logpmf(np.arange(-1500, 1501), mu))
        assert abs(total) < 1e-12


@pytest.mark.parametrize("mu", [2.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_one_dimensional_bound_is_above_the_exact_divergence(mu, shift):
    alphas = [2, 3, 8, 32]
    upper = bound(mu, shift, shift, alphas)  # 1-D: l1 = l2 = |shift|
    exact = np.array([exact_divergence(mu, shift, a) for a in alphas])
    assert np.all(upper >= exact * (1 + 1e-12)), (upper, exact)


def test_bound_is_close_to_exact_for_large_mu():
    # mu = 1000, shift 1: bound / exact within 1 % at small orders (both ~ alpha / (2 mu))
    alphas = [2, 4, 8]
    ratio = bound(1000.0, 1, 1, alphas) / np.array([exact_divergence(1000.0, 1, a) for a in alphas])
    assert np.all(ratio >= 1.0) and np.all(ratio < 1.01), ratio


def test_multidimensional_bound_is_above_the_exact_product_divergence():
    """A shift v = (2, 1, -1): the divergence of independent coordinates adds; l2 = sqrt(6), l1 = 4."""
    v, mu = (2, 1, -1), 5.0
    for alpha in (2, 5, 16):
        exact = sum(exact_divergence(mu, s, alpha) for s in v)
        assert bound(mu, math.sqrt(6.0), 4.0, [alpha])[0] >= exact


@pytest.mark.parametrize("mu, shift, q", [(4.0, 1, 0.01), (4.0, 2, 0.1), (50.0, 1, 0.5), (20.0, 3, 0.05)])
def test_zhu_wang_bound_is_above_the_exact_subsampled_divergence(mu, shift, q):
    orders = np.arange(2, 25, dtype=float)
    base_exact = np.array([exact_divergence(mu, shift, int(a)) for a in orders])
    zw_exact_base = skellam.poisson_subsampled_rdp(base_rdp=base_exact, sample_rate=q, orders=orders)
    zw_skellam = skellam.poisson_subsampled_rdp(base_rdp=bound(mu, shift, shift, orders), sample_rate=q, orders=orders)
    for i in (0, 1, 4, 12, 22):  # alpha = 2, 3, 6, 14, 24
        exact = exact_subsampled_divergence(mu, shift, int(orders[i]), q)
        assert zw_exact_base[i] >= exact * (1 - 1e-9)  # equality at alpha = 2, (orders[i], zw_exact_base[i], exact)
        assert zw_skellam[i] >= zw_exact_base[i] * (1 - 1e-12)
    # subsampling helps: well below the base curve at small q
    if q <= 0.05:
        assert zw_skellam[0] < 0.1 * bound(mu, shift, shift, [2])[0]


def test_hand_computed_values():
    """mu = 100, l1 = l2 = 1: eps(2) = 2/200 + min(9/40000, 3/200) = 0.010225; eps(3) = 0.015 + 11/40000."""
    eps2, eps3 = 0.010225, 0.015275
    np.testing.assert_allclose(bound(100.0, 1.0, 1.0, [2, 3]), [eps2, eps3], rtol=1e-14)
    q = 0.1
    # Zhu & Wang Thm 6 written out: alpha = 2: log((1-q)(1+q) + q^2 e^eps2); alpha = 3 with the factor 3 on l = 3
    a2 = math.log((1 - q) * (1 + q) + q**2 * math.exp(eps2))
    a3 = math.log((1 - q) ** 2 * (1 + 2 * q) + 3 * q**2 * (1 - q) * math.exp(eps2) + 3 * q**3 * math.exp(2 * eps3)) / 2
    got = skellam.poisson_subsampled_rdp(base_rdp=bound(100.0, 1.0, 1.0, [2, 3]), sample_rate=q,
                                         orders=np.array([2.0, 3.0]))
    np.testing.assert_allclose(got, [a2, a3], rtol=1e-12)
    assert got[0] == pytest.approx(1.02775e-4, rel=1e-4)  # log(1 + 0.01 (e^0.010225 - 1))


def test_gaussian_limit():
    """As mu grows the Skellam RDP approaches the Gaussian alpha l2^2 / (2 sigma^2) with sigma^2 = mu."""
    alphas = np.array([2.0, 10.0, 64.0])
    gaps = []
    for mu in (1e2, 1e4, 1e6):
        ratio = bound(mu, 3.0, 7.0, alphas) / (alphas * 9.0 / (2 * mu))
        assert np.all(ratio >= 1.0)
        gaps.append(float(np.max(ratio - 1.0)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


def test_subsampled_epsilon_is_between_the_tight_gaussian_and_a_modest_factor_above():
    """Same variance and sensitivity: the Gaussian (Mironov et al., tight) is a lower reference; Zhu-Wang's general bound
    costs a modest factor at q = 0.01."""
    l2, q, steps = 1000.0, 0.01, 1000
    mech = skellam.PoissonSkellam(mu=l2**2, l2_sensitivity=l2, l1_sensitivity=45 * l2, sample_rate=q, steps=steps)
    eps_sk = skellam.epsilon([mech], delta=1e-5)
    eps_g = rdp.epsilon([PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=q, count=steps)], delta=1e-5)
    assert eps_g <= eps_sk <= 1.3 * eps_g, (eps_g, eps_sk)


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.02, 200), (3.0, 0.1, 50), (8.0, 1.0, 1)])
def test_calibration_round_trip(target, q, steps):
    l2, l1 = 300.0, 300.0 * 30
    mu = skellam.calibrate_mu(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, l2_sensitivity=l2,
                              l1_sensitivity=l1)

    def eps(m):
        return skellam.epsilon([skellam.PoissonSkellam(mu=m, l2_sensitivity=l2, l1_sensitivity=l1, sample_rate=q,
                                                       steps=steps)], delta=1e-5)

    assert eps(mu) <= target < eps(mu / 1.001)


def test_colluding_server_view_uses_one_share():
    kw = {"l2_sensitivity": 100.0, "l1_sensitivity": 1000.0, "sample_rate": 0.05, "steps": 100, "delta": 1e-5}
    mu = skellam.calibrate_mu(target_epsilon=2.0, **{k: v for k, v in kw.items()})
    assert skellam.site_mu(mu_total=mu, min_sites=4) == mu / 4
    one = skellam.colluding_server_epsilon(mu_total=mu, min_sites=1, **kw)
    four = skellam.colluding_server_epsilon(mu_total=mu, min_sites=4, **kw)
    assert one == pytest.approx(skellam.epsilon([skellam.PoissonSkellam(
        mu=mu, l2_sensitivity=100.0, l1_sensitivity=1000.0, sample_rate=0.05, steps=100)], delta=1e-5))
    assert one <= 2.0 < four


def test_composition_adds_rdp():
    a = skellam.PoissonSkellam(mu=1e4, l2_sensitivity=50.0, l1_sensitivity=500.0, sample_rate=0.1, steps=3)
    b = skellam.PoissonSkellam(mu=1e4, l2_sensitivity=50.0, l1_sensitivity=500.0, sample_rate=0.1, steps=1)
    np.testing.assert_allclose(skellam.rdp_curve([a]), 3 * skellam.rdp_curve([b]))
    assert skellam.epsilon([b, b, b], delta=1e-5) == pytest.approx(skellam.epsilon([a], delta=1e-5))
    assert skellam.epsilon([], delta=1e-5) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"mu": 0.0}, "mu"),
    ({"l2_sensitivity": 0.5}, "l2_sensitivity must be >= 1"),
    ({"l1_sensitivity": 5.0}, "l1_sensitivity must be >= l2_sensitivity"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"steps": 0}, "steps"),
])
def test_invalid_input_names_the_parameter(kwargs, match):
    good = {"mu": 10.0, "l2_sensitivity": 10.0, "l1_sensitivity": 20.0, "sample_rate": 0.1, "steps": 1}
    with pytest.raises(AccountingInputError, match=match):
        skellam.PoissonSkellam(**{**good, **kwargs})


def test_orders_must_be_consecutive_integers_from_two():
    with pytest.raises(AccountingInputError, match="consecutive"):
        skellam.poisson_subsampled_rdp(base_rdp=np.ones(3), sample_rate=0.1, orders=np.array([2.0, 4.0, 8.0]))
    with pytest.raises(AccountingInputError, match="integer orders"):
        skellam.skellam_rdp(mu=1.0, l2_sensitivity=1.0, l1_sensitivity=1.0, orders=np.array([1.5]))
