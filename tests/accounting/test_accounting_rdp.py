"""RDP bounds: closed forms, two independent computations, and dp_accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accounting import rdp
from accounting.errors import AccountingInputError
from accounting.events import FixedSizeGaussianEvent, GaussianEvent, PoissonGaussianEvent


def pg(sigma, q, steps, unit="record"):
    return PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps, unit=unit)


def test_sanity_value_from_reference():
    # REFERENCE.md: q = 0.01, sigma = 1, 1000 steps, delta = 1e-5 -> about 2.10 with RDP.
    assert rdp.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5) == pytest.approx(2.10, abs=0.01)


def test_gaussian_closed_form():
    orders = np.array([1.5, 2.0, 10.0])
    np.testing.assert_allclose(rdp.rdp_gaussian(noise_multiplier=2.0, orders=orders), orders / 8.0)
    np.testing.assert_allclose(
        rdp.rdp_poisson_gaussian(noise_multiplier=2.0, sample_rate=1.0, orders=orders), orders / 8.0
    )
    # Gaussian composition = one Gaussian with sigma / sqrt(k)
    assert rdp.epsilon([GaussianEvent(noise_multiplier=2.0, count=4)], delta=1e-5) == pytest.approx(
        rdp.epsilon([GaussianEvent(noise_multiplier=1.0)], delta=1e-5)
    )


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.2, 0.5), (0.001, 3.0), (0.1, 0.7)])
def test_quadrature_matches_binomial_sum_at_integer_orders(q, sigma):
    """Two independent computations of A_alpha: the finite binomial sum and the quadrature."""
    alphas = np.array([2.0, 3.0, 8.0, 32.0])
    exact = rdp._log_a_integer(q, sigma, alphas)
    quadrature = rdp._log_a_quadrature(q, sigma, alphas)
    np.testing.assert_allclose(quadrature, exact, rtol=1e-9, atol=1e-14)


def test_fractional_orders_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    for q, sigma, alpha in [(0.2, 5.0, 1.1), (0.001, 0.5, 1.3), (0.05, 0.8, 4.5)]:
        def integrand(z, q=q, sigma=sigma, alpha=alpha):
            return mpmath.npdf(z, 0, sigma) * ((1 - q) + q * mpmath.e ** ((2 * z - 1) / (2 * sigma**2))) ** alpha

        reference = float(mpmath.log(mpmath.quad(integrand, [-mpmath.inf, 0, 1, mpmath.inf])) / (alpha - 1))
        mine = rdp.rdp_poisson_gaussian(noise_multiplier=sigma, sample_rate=q, orders=np.array([alpha]))[0]
        assert mine == pytest.approx(reference, rel=1e-8)


def test_agrees_with_dp_accounting_at_integer_orders():
    dp_rdp = pytest.importorskip("dp_accounting.rdp")
    from dp_accounting import dp_event

    orders = [float(a) for a in range(2, 65)]
    for q, sigma, steps, delta in [(0.01, 1.0, 1000, 1e-5), (0.2, 2.0, 100, 1e-6), (0.001, 0.7, 20000, 1e-7)]:
        accountant = dp_rdp.RdpAccountant(orders=orders)
        accountant.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
        mine = rdp.epsilon([pg(sigma, q, steps)], delta=delta, orders=np.array(orders))
        assert mine == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)


def test_conversion_formula_and_validation():
    orders = np.array([2.0, 4.0, 8.0])
    values = np.array([0.1, 0.3, 0.9])
    eps, order = rdp.epsilon_from_rdp(orders=orders, rdp=values, delta=1e-5)
    by_hand = [r + math.log1p(-1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1) for a, r in zip(orders, values)]
    assert eps == pytest.approx(min(by_hand)) and order == orders[int(np.argmin(by_hand))]
    with pytest.raises(AccountingInputError, match="delta must be in \\(0, 1\\), got 1.5"):
        rdp.epsilon_from_rdp(orders=orders, rdp=values, delta=1.5)
    with pytest.raises(AccountingInputError, match="orders must be > 1"):
        rdp.epsilon_from_rdp(orders=np.array([1.0]), rdp=np.array([0.1]), delta=1e-5)


def test_composition_is_additive_and_validated():
    a, b = pg(1.0, 0.01, 300), pg(2.0, 0.05, 200)
    np.testing.assert_allclose(rdp.rdp_curve([a, b]), rdp.rdp_curve([a]) + rdp.rdp_curve([b]))
    assert rdp.epsilon([], delta=1e-5) == 0.0
    with pytest.raises(AccountingInputError, match="one privacy unit"):
        rdp.epsilon([a, pg(1.0, 0.01, 10, unit="client")], delta=1e-5)
    for bad in (0, 1, -1e-5, math.nan, "x"):
        with pytest.raises(AccountingInputError, match="delta"):
            rdp.epsilon([a], delta=bad)


def test_fixed_size_is_accounted_as_poisson_with_half_the_noise():
    fixed = FixedSizeGaussianEvent(noise_multiplier=2.0, sample_rate=0.02, count=500)
    assert rdp.epsilon([fixed], delta=1e-5) == rdp.epsilon([pg(1.0, 0.02, 500)], delta=1e-5)
