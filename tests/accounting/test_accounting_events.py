"""Events: validation on construction, serialisation, and the fixed-size reduction."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import stats

from accounting.errors import AccountingInputError
from accounting.events import (
    FixedSizeGaussianEvent,
    GaussianEvent,
    PoissonGaussianEvent,
    dominating_event,
    event_from_dict,
    event_to_dict,
    mechanism_counts,
    privacy_unit,
)

ALL = [
    PoissonGaussianEvent(noise_multiplier=1.1, sample_rate=0.01, count=100),
    GaussianEvent(noise_multiplier=5.0),
    GaussianEvent(noise_multiplier=2.0, count=3, unit="client"),
    FixedSizeGaussianEvent(noise_multiplier=0.9, sample_rate=0.25, count=7),
]


@pytest.mark.parametrize("event", ALL)
def test_round_trip_through_dict(event):
    data = event_to_dict(event)
    assert "type" in data
    assert event_from_dict(data) == event
    assert event_from_dict(dict(data)) == event


def test_events_are_frozen_and_keyword_only():
    event = ALL[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.noise_multiplier = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoissonGaussianEvent(1.0, 0.01, 10)  # type: ignore[misc]


def test_numbers_are_normalised():
    event = PoissonGaussianEvent(noise_multiplier=1, sample_rate=1, count=np.int64(5))
    assert isinstance(event.noise_multiplier, float) and isinstance(event.count, int)


@pytest.mark.parametrize(
    "kwargs, parameter, shown",
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier", "-1.0"),
        ({"noise_multiplier": 0.0}, "noise_multiplier", "0.0"),
        ({"noise_multiplier": math.inf}, "noise_multiplier", "inf"),
        ({"noise_multiplier": math.nan}, "noise_multiplier", "nan"),
        ({"noise_multiplier": True}, "noise_multiplier", "True"),
        ({"noise_multiplier": "1"}, "noise_multiplier", "'1'"),
        ({"sample_rate": 0.0}, "sample_rate", "0.0"),
        ({"sample_rate": 1.5}, "sample_rate", "1.5"),
        ({"sample_rate": math.nan}, "sample_rate", "nan"),
        ({"count": 0}, "count", "0"),
        ({"count": 2.5}, "count", "2.5"),
        ({"count": True}, "count", "True"),
        ({"unit": "user"}, "unit", "'user'"),
    ],
)
@pytest.mark.parametrize("cls", [PoissonGaussianEvent, FixedSizeGaussianEvent])
def test_validation_names_parameter_and_value(cls, kwargs, parameter, shown):
    base = {"noise_multiplier": 1.0, "sample_rate": 0.1, "count": 10, "unit": "record"}
    with pytest.raises(AccountingInputError) as info:
        cls(**{**base, **kwargs})
    assert parameter in str(info.value) and shown in str(info.value)


def test_gaussian_event_validation():
    with pytest.raises(AccountingInputError, match="noise_multiplier.*-2"):
        GaussianEvent(noise_multiplier=-2)
    with pytest.raises(AccountingInputError, match="count"):
        GaussianEvent(noise_multiplier=2, count=0)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"type": "laplace", "noise_multiplier": 1.0}, "type"),
        ({"noise_multiplier": 1.0}, "type"),
        ({"type": "gaussian", "noise_multiplier": 1.0, "extra": 1}, "unknown field"),
        ({"type": "poisson_gaussian", "noise_multiplier": 1.0, "count": 3}, "missing field"),
        ({"type": "poisson_gaussian", "noise_multiplier": -1.0, "sample_rate": 0.1, "count": 3}, "noise_multiplier"),
        ([1, 2], "JSON object"),
    ],
)
def test_from_dict_rejects_bad_input(data, message):
    with pytest.raises(AccountingInputError, match=message):
        event_from_dict(data)


def test_units_must_not_mix():
    assert privacy_unit([]) is None
    assert privacy_unit(ALL[:2]) == "record"
    with pytest.raises(AccountingInputError, match="one privacy unit"):
        privacy_unit(ALL[:3])
    with pytest.raises(AccountingInputError, match="events"):
        privacy_unit([object()])


def test_mechanism_counts_merges_identical_and_reduces_fixed_size():
    events = [
        PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=5),
        PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=7),
        GaussianEvent(noise_multiplier=3.0),
        PoissonGaussianEvent(noise_multiplier=3.0, sample_rate=1.0, count=2),
        FixedSizeGaussianEvent(noise_multiplier=2.0, sample_rate=0.1, count=4),
    ]
    assert mechanism_counts(events) == [(1.0, 0.1, 16), (3.0, 1.0, 3)]
    assert dominating_event(events[-1]) == PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=4)


# -- the fixed-size reduction against brute force --------------------------------------
def _hockey_stick(p: np.ndarray, q: np.ndarray, eps: float, dx: float) -> float:
    return float(np.maximum(p - math.exp(eps) * q, 0.0).sum() * dx)


def _fixed_size_output_density(values: list[float], batch: int, sigma: float, grid: np.ndarray) -> np.ndarray:
    """Exact density of sum(batch drawn without replacement) + N(0, sigma^2), by enumeration."""
    subsets = list(itertools.combinations(range(len(values)), batch))
    density = np.zeros_like(grid)
    for subset in subsets:
        density += stats.norm.pdf(grid, loc=sum(values[i] for i in subset), scale=sigma)
    return density / len(subsets)


@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_fixed_size_reduction_dominates_brute_force(sigma):
    """Add/remove neighbours with clipped contributions in [-1, 1]: the exact privacy profile of
    fixed-size sampling is below that of the Poisson pair (rate b/n, noise sigma/2), and equal
    in the worst case (the added record pulls the sum by 2)."""
    n, batch = 5, 2  # n = size of the larger dataset; sample_rate = batch / n
    reduced = dominating_event(FixedSizeGaussianEvent(noise_multiplier=sigma, sample_rate=batch / n, count=1))
    q, s = reduced.sample_rate, reduced.noise_multiplier
    grid = np.linspace(-12 - 4 * sigma, 12 + 4 * sigma, 40001)
    dx = grid[1] - grid[0]
    # Poisson pair: N(0, s^2) vs (1-q) N(0, s^2) + q N(1, s^2), both orders.
    p0 = stats.norm.pdf(grid, 0, s)
    p1 = (1 - q) * p0 + q * stats.norm.pdf(grid, 1, s)
    rng = np.random.default_rng(7)
    datasets = [[1.0] * (n - 1) + [-1.0]]  # worst case: x = -1 among +1's
    datasets += [list(rng.uniform(-1, 1, n)) for _ in range(3)]
    for big in datasets:
        small = big[:-1]  # remove the last record
        with_x = _fixed_size_output_density(big, batch, sigma, grid)
        without_x = _fixed_size_output_density(small, batch, sigma, grid)
        for eps in (0.0, 0.5, 1.0, 2.0):
            bound = max(_hockey_stick(p1, p0, eps, dx), _hockey_stick(p0, p1, eps, dx))
            exact = max(_hockey_stick(with_x, without_x, eps, dx), _hockey_stick(without_x, with_x, eps, dx))
            assert exact <= bound * (1 + 1e-6) + 1e-9  # equal in the worst case, up to quadrature error
    worst_with = _fixed_size_output_density(datasets[0], batch, sigma, grid)
    worst_without = _fixed_size_output_density(datasets[0][:-1], batch, sigma, grid)
    assert _hockey_stick(worst_with, worst_without, 0.5, dx) == pytest.approx(_hockey_stick(p1, p0, 0.5, dx), rel=1e-6)
