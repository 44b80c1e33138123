"""Planning: inverse consistency of calibrate_noise, max_rounds boundaries, curves, validation."""

from __future__ import annotations

import math

import pytest

from accounting import planning, prv, rdp
from accounting.errors import AccountingInputError
from accounting.events import GaussianEvent, PoissonGaussianEvent


def pg(sigma, q, steps):
    return PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)


def worst_upper(sigma, workloads, fixed, delta, accountant="prv"):
    return max(
        planning.bound([pg(sigma, q, steps), *fixed], delta=delta, accountant=accountant).upper
        for q, steps in workloads
    )


@pytest.mark.parametrize(
    "value, expected",
    [(0.74812, 0.749), (0.75, 0.75), (1.0, 1.0), (999.1, 1000.0), (0.0012341, 0.00124), (123.0, 123.0),
     (9.999, 10.0), (0.1, 0.1), (5.0001, 5.01)],
)
def test_round_up_to_three_significant_digits(value, expected):
    assert planning.round_up_sig(value) == expected


CASES = [
    # (target epsilon, delta, workloads (q, T) per client, DP-init sigma or None, accountant)
    (1.0, 1e-5, [(0.01, 1000)], None, "prv"),
    (3.0, 1e-6, [(0.05, 400)], None, "prv"),
    (8.0, 1e-5, [(0.1, 200)], None, "prv"),
    (2.0, 1e-5, [(0.01, 1500), (0.02, 1500), (0.004, 3000)], None, "prv"),  # heterogeneous clients
    (2.0, 1e-5, [(0.02, 500)], 4.0, "prv"),  # DP initialisation composed in
    (2.0, 1e-5, [(0.01, 1500), (0.02, 800)], None, "rdp"),
]


@pytest.mark.parametrize("target, delta, workloads, init_sigma, accountant", CASES)
def test_calibrate_noise_is_inverse_of_epsilon(target, delta, workloads, init_sigma, accountant):
    fixed = [GaussianEvent(noise_multiplier=init_sigma)] if init_sigma else []
    sigma = planning.calibrate_noise(target_epsilon=target, delta=delta, workloads=workloads,
                                     fixed_events=fixed, accountant=accountant)
    assert sigma == planning.round_up_sig(sigma)
    assert worst_upper(sigma, workloads, fixed, delta, accountant) <= target
    assert worst_upper(0.99 * sigma, workloads, fixed, delta, accountant) > target
    # minimal on the 3-digit grid
    below = planning._grid_value(planning._grid_index_up(sigma) - 1)
    assert worst_upper(below, workloads, fixed, delta, accountant) > target


def test_heterogeneous_worst_client_decides():
    workloads = [(0.01, 1000), (0.03, 1000), (0.02, 2000)]
    sigma = planning.calibrate_noise(target_epsilon=2.0, delta=1e-5, workloads=workloads)
    per_client = [planning.calibrate_noise(target_epsilon=2.0, delta=1e-5, workloads=[w]) for w in workloads]
    assert sigma == max(per_client)
    assert planning.pareto_workloads(workloads + [(0.01, 500)]) == [(0.03, 1000), (0.02, 2000)]


def test_rdp_needs_more_noise_than_prv():
    args = dict(target_epsilon=2.0, delta=1e-5, workloads=[(0.01, 2000)])
    assert planning.calibrate_noise(**args, accountant="rdp") > planning.calibrate_noise(**args)


def test_fixed_events_alone_exceeding_the_target_are_rejected():
    with pytest.raises(AccountingInputError, match="fixed_events alone"):
        planning.calibrate_noise(target_epsilon=0.5, delta=1e-5, workloads=[(0.01, 100)],
                                 fixed_events=[GaussianEvent(noise_multiplier=1.0)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be finite and > 0, got 0.0"),
        ({"target_epsilon": -1}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"delta": 1.0}, "delta must be in \\(0, 1\\), got 1.0"),
        ({"workloads": []}, "workloads"),
        ({"workloads": [(1.5, 10)]}, "sample_rate"),
        ({"workloads": [(0.1, 0)]}, "count"),
        ({"accountant": "gdp"}, "accountant"),
        ({"fixed_events": [PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=1, unit="client")]},
         "unit"),
    ],
)
def test_calibrate_noise_validation(kwargs, message):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "workloads": [(0.01, 100)], **kwargs}
    with pytest.raises(AccountingInputError, match=message):
        planning.calibrate_noise(**args)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("sigma, q, per_round, target, init", [(1.0, 0.01, 100, 2.0, None), (0.8, 0.02, 50, 4.0, 5.0)])
def test_max_rounds_is_the_boundary(accountant, sigma, q, per_round, target, init):
    fixed = [GaussianEvent(noise_multiplier=init)] if init else []
    rounds = planning.max_rounds(noise_multiplier=sigma, target_epsilon=target, delta=1e-5, sample_rate=q,
                                 steps_per_round=per_round, fixed_events=fixed, accountant=accountant)
    assert rounds >= 1

    def upper(r):
        return planning.bound([pg(sigma, q, r * per_round), *fixed], delta=1e-5, accountant=accountant).upper

    assert upper(rounds) <= target < upper(rounds + 1)


def test_max_rounds_zero_when_one_round_is_too_much():
    assert planning.max_rounds(noise_multiplier=0.5, target_epsilon=0.1, delta=1e-5, sample_rate=0.1,
                               steps_per_round=100) == 0


def test_epsilon_curve_is_increasing_and_consistent():
    curve = planning.epsilon_curve(noise_multiplier=1.0, delta=1e-5, sample_rate=0.01, steps_per_round=100,
                                   rounds=10, points=5)
    rounds = [r for r, _ in curve]
    assert rounds[0] == 1 and rounds[-1] == 10
    uppers = [b.upper for _, b in curve]
    assert uppers == sorted(uppers)
    last = prv.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5)
    assert curve[-1][1].upper == pytest.approx(last.upper, abs=1e-3)
    rdp_curve = planning.epsilon_curve(noise_multiplier=1.0, delta=1e-5, sample_rate=0.01, steps_per_round=100,
                                       rounds=[10], accountant="rdp")
    assert rdp_curve[0][1].upper == pytest.approx(rdp.epsilon([pg(1.0, 0.01, 1000)], delta=1e-5))


def test_epsilon_by_noise_decreases():
    points = planning.epsilon_by_noise(noise_multipliers=[0.8, 1.0, 1.5], delta=1e-5, sample_rate=0.01, steps=500)
    uppers = [b.upper for _, b in points]
    assert uppers == sorted(uppers, reverse=True)


@pytest.mark.slow
def test_calibrate_large_case_from_the_brief():
    sigma = planning.calibrate_noise(target_epsilon=3.0, delta=1e-5, workloads=[(0.001, 100_000)])
    assert prv.epsilon([pg(sigma, 0.001, 100_000)], delta=1e-5).upper <= 3.0
    assert prv.epsilon([pg(0.99 * sigma, 0.001, 100_000)], delta=1e-5).upper > 3.0
