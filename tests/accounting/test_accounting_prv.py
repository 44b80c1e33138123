"""PRV bounds against dp_accounting's PLD accountant and against RDP."""

from __future__ import annotations

import logging

import pytest

from accounting import prv, rdp
from accounting.errors import AccountingInputError
from accounting.events import FixedSizeGaussianEvent, GaussianEvent, PoissonGaussianEvent
from accounting.prv import EpsilonBound


def pg(sigma, q, steps, unit="record"):
    return PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps, unit=unit)


# Reference epsilons computed once with dp_accounting 0.6.0:
#   acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-5)  # pessimistic (default)
#   acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))
#   acc.get_epsilon(delta)
# (q, sigma, steps, delta) -> reference epsilon
PINNED = [
    ((0.01, 1.0, 1000, 1e-5), 1.82824),  # REFERENCE.md sanity value (~1.83)
    ((0.001, 0.75, 100000, 1e-5), 3.01766),
    ((0.2, 5.0, 10, 1e-7), 0.65070),
    ((0.2, 2.0, 1000, 1e-5), 19.44548),
    ((0.05, 0.8, 500, 1e-6), 13.55622),
    ((0.001, 0.5, 10000, 1e-4), 4.07717),
    ((0.005, 1.5, 20000, 1e-7), 2.68574),
    ((0.1, 3.0, 100, 1e-4), 1.15882),
    ((0.02, 0.6, 2000, 1e-6), 22.35538),
    ((0.001, 5.0, 100000, 1e-7), 0.27902),
]
# prv-accountant 0.2.0 raises "Discrete mean differs from continuous mean" here; we fall back to RDP.
PINNED_FALLBACK = ((0.2, 0.5, 100, 1e-5), 57.18071)
# Heterogeneous: dp_accounting ComposedDpEvent of the same events, same accountant settings.
PINNED_HETEROGENEOUS = [
    (([(1.0, 0.01, 1000), (1.5, 0.02, 500)], None, 1e-5), 2.30313),
    (([(0.8, 0.005, 4000), (2.0, 0.1, 200)], 3.0, 1e-6), 5.32601),
]


def within_acceptance(upper: float, reference: float) -> bool:
    return reference - 0.02 <= upper <= reference + max(0.05, 0.02 * reference)


@pytest.mark.parametrize("case, reference", PINNED, ids=[str(c) for c, _ in PINNED])
def test_upper_bound_agrees_with_pinned_pld(case, reference):
    q, sigma, steps, delta = case
    bound = prv.epsilon([pg(sigma, q, steps)], delta=delta)
    assert within_acceptance(bound.upper, reference), (bound, reference)
    assert bound.lower <= reference + 1e-6  # the PLD reference is itself an upper bound
    assert abs(bound.estimate - reference) <= 0.005 * max(1.0, reference)
    # RDP is never below PRV by more than the PRV error
    assert rdp.epsilon([pg(sigma, q, steps)], delta=delta) >= bound.lower


def test_sanity_value_from_reference():
    bound = prv.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5)
    assert bound.estimate == pytest.approx(1.83, abs=0.005)
    assert bound.lower <= 1.83 <= bound.upper


@pytest.mark.parametrize("case, reference", PINNED_HETEROGENEOUS)
def test_heterogeneous_composition_agrees_with_pinned_pld(case, reference):
    segments, init_sigma, delta = case
    events = [pg(s, q, t) for s, q, t in segments]
    if init_sigma is not None:
        events.append(GaussianEvent(noise_multiplier=init_sigma))
    bound = prv.epsilon(events, delta=delta)
    assert within_acceptance(bound.upper, reference), (bound, reference)
    assert rdp.epsilon(events, delta=delta) >= bound.lower


def _pld_reference(events, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    dp_events = []
    for e in events:
        gaussian = dp_event.GaussianDpEvent(e.noise_multiplier)
        inner = gaussian if isinstance(e, GaussianEvent) else dp_event.PoissonSampledDpEvent(e.sample_rate, gaussian)
        dp_events.append(dp_event.SelfComposedDpEvent(inner, e.count))
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.ComposedDpEvent(dp_events))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "events, delta",
    [
        ([pg(1.2, 0.02, 800)], 1e-6),
        ([pg(0.9, 0.01, 300), pg(2.5, 0.1, 50), GaussianEvent(noise_multiplier=4.0)], 1e-5),
    ],
)
def test_agrees_with_live_pld(events, delta):
    reference = _pld_reference(events, delta)
    bound = prv.epsilon(events, delta=delta)
    assert within_acceptance(bound.upper, reference), (bound, reference)


def test_fallback_to_rdp_when_the_library_fails(caplog):
    (q, sigma, steps, delta), reference = PINNED_FALLBACK
    with caplog.at_level(logging.WARNING, logger="accounting.prv"):
        bound = prv.epsilon([pg(sigma, q, steps)], delta=delta)
    assert "RDP bound" in caplog.text
    assert bound.lower == 0.0
    assert bound.upper == pytest.approx(rdp.epsilon([pg(sigma, q, steps)], delta=delta))
    assert bound.upper >= reference  # sound, if looser
    assert bound.source == "rdp" and prv.epsilon([pg(1.0, 0.01, 100)], delta=1e-5).source == "prv"


def test_summary_names_the_accountant_each_reported_epsilon_came_from():
    """A client whose PRV computation fell back to RDP is named in summary.json's accountant label."""
    from dpfed.rundir import _accountant_label

    (q, sigma, steps, delta), _ = PINNED_FALLBACK
    failed = prv.epsilon([pg(sigma, q, steps)], delta=delta)
    fine = prv.epsilon([pg(1.0, 0.01, 100)], delta=1e-5)
    assert _accountant_label({"client-000": fine, "client-001": fine}) == "prv (upper bound)"
    assert "rdp (upper bound) for client-001" in _accountant_label({"client-000": fine, "client-001": failed})
    assert _accountant_label({"client-000": failed}).startswith("rdp (upper bound")


def test_empty_identical_and_unit_rules():
    assert prv.epsilon([], delta=1e-5) == EpsilonBound(0.0, 0.0, 0.0)
    split = prv.epsilon([pg(1.0, 0.01, 400), pg(1.0, 0.01, 600)], delta=1e-5)
    whole = prv.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5)
    assert split == whole
    with pytest.raises(AccountingInputError, match="one privacy unit"):
        prv.epsilon([pg(1.0, 0.01, 10), pg(1.0, 0.01, 10, unit="client")], delta=1e-5)
    client = prv.epsilon([pg(1.0, 0.01, 1000, unit="client")], delta=1e-5)
    assert client == whole  # the unit says what is protected; the arithmetic is the same


def test_fixed_size_uses_the_dominating_poisson_event():
    fixed = FixedSizeGaussianEvent(noise_multiplier=2.0, sample_rate=0.01, count=1000)
    assert prv.epsilon([fixed], delta=1e-5) == prv.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5)


def test_explicit_eps_error_and_default():
    events = [pg(1.0, 0.01, 1000)]
    tight = prv.epsilon(events, delta=1e-5, eps_error=0.005)
    assert tight.upper - tight.estimate <= 0.0055  # eps_error plus the delta_error shift
    default = prv.epsilon(events, delta=1e-5)
    expected_error = prv.default_eps_error(rdp.epsilon(events, delta=1e-5))
    assert default.upper - default.estimate <= expected_error + 1e-3
    assert tight.upper <= default.upper
    for bad in (0, -0.1, float("nan"), "0.1"):
        with pytest.raises(AccountingInputError, match="eps_error"):
            prv.epsilon(events, delta=1e-5, eps_error=bad)
    for bad in (0, 1, 2.0):
        with pytest.raises(AccountingInputError, match="delta"):
            prv.epsilon(events, delta=bad)


def test_epsilon_over_rounds_matches_single_evaluations():
    step = pg(1.0, 0.02, 50)
    fixed = [GaussianEvent(noise_multiplier=5.0)]
    bounds = prv.epsilon_over_rounds([step], rounds=[1, 4, 10], delta=1e-5, fixed_events=fixed, eps_error=0.02)
    assert [b.upper for b in bounds] == sorted(b.upper for b in bounds)
    for rounds, bound in zip([1, 4, 10], bounds):
        single = prv.epsilon([pg(1.0, 0.02, 50 * rounds), *fixed], delta=1e-5, eps_error=0.02)
        assert bound.estimate == pytest.approx(single.estimate, abs=2e-3)
        assert bound.lower <= single.upper and single.lower <= bound.upper


def test_epsilon_bound_is_validated():
    with pytest.raises(AccountingInputError, match="lower <= estimate <= upper"):
        EpsilonBound(2.0, 1.0, 3.0)
    with pytest.raises(AccountingInputError, match="upper"):
        EpsilonBound(0.0, 0.0, float("nan"))
