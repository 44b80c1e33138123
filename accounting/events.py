"""Immutable, serialisable records of the privacy mechanisms a client ran.

A ledger stores events; epsilon is always derived from them, never stored as truth.
Every noise multiplier is relative to the L2 sensitivity of the query with respect to
one unit of privacy (the clipping norm for record-level DP-SGD, the client clip for
DP-FedAvg), and every guarantee is for the add/remove-one neighbouring relation.

Events:

- :class:`PoissonGaussianEvent`: ``count`` steps of the Poisson-subsampled Gaussian
  mechanism (each unit joins a step independently with probability ``sample_rate``).
- :class:`GaussianEvent`: ``count`` releases of the Gaussian mechanism without
  subsampling (e.g. a DP initialisation's single noised gradient sum).
- :class:`FixedSizeGaussianEvent`: ``count`` steps on a batch of fixed size ``b``
  drawn without replacement from ``n`` units (``sample_rate = b / n``). Accounted by
  the conservative reduction in :func:`dominating_event`.
- :class:`PoissonSkellamEvent`: ``count`` releases of the Poisson-subsampled
  multidimensional Skellam mechanism (distributed DP with secure aggregation): ``mu`` is
  the Skellam variance per coordinate of the released integer sum, ``l2_sensitivity`` and
  ``l1_sensitivity`` one unit's largest contribution to it (integer units). It has no
  noise multiplier and no PRV: :func:`accounting.prv.epsilon` composes it with the RDP
  bound of :mod:`accounting.skellam`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Union

from accounting.errors import AccountingInputError

UNITS = ("record", "client")


def _check_noise_multiplier(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingInputError(f"noise_multiplier must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise AccountingInputError(f"noise_multiplier must be finite and > 0, got {value!r}")
    return value


def _check_sample_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingInputError(f"sample_rate must be a real number, got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise AccountingInputError(f"sample_rate must be in (0, 1], got {value!r}")
    return value


def _check_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AccountingInputError(f"count must be an integer >= 1, got {value!r}")
    value = int(value)
    if value < 1:
        raise AccountingInputError(f"count must be an integer >= 1, got {value!r}")
    return value


def _check_unit(value: Any) -> str:
    if value not in UNITS:
        raise AccountingInputError(f"unit must be one of {', '.join(UNITS)}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PoissonGaussianEvent:
    """``count`` self-compositions of the Poisson-subsampled Gaussian mechanism.

    Each unit is included in a step independently with probability ``sample_rate``; the
    sum of clipped contributions gets N(0, (noise_multiplier * clip)^2) noise.
    """

    noise_multiplier: float
    sample_rate: float
    count: int
    unit: str = "record"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        object.__setattr__(self, "count", _check_count(self.count))
        object.__setattr__(self, "unit", _check_unit(self.unit))


@dataclass(frozen=True, kw_only=True)
class GaussianEvent:
    """``count`` releases of the Gaussian mechanism on the full data (no subsampling)."""

    noise_multiplier: float
    count: int = 1
    unit: str = "record"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "count", _check_count(self.count))
        object.__setattr__(self, "unit", _check_unit(self.unit))


@dataclass(frozen=True, kw_only=True)
class FixedSizeGaussianEvent:
    """``count`` steps on a fixed-size batch drawn uniformly without replacement.

    ``sample_rate`` is batch size / dataset size. See :func:`dominating_event` for how
    it is accounted.
    """

    noise_multiplier: float
    sample_rate: float
    count: int
    unit: str = "record"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        object.__setattr__(self, "count", _check_count(self.count))
        object.__setattr__(self, "unit", _check_unit(self.unit))


def _check_positive(value: Any, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AccountingInputError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= minimum:
        raise AccountingInputError(f"{name} must be finite and > {minimum:g}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PoissonSkellamEvent:
    """``count`` releases of the Poisson-subsampled multidimensional Skellam mechanism (:mod:`accounting.skellam`).

    ``mu``: Skellam variance per coordinate of the noise in the released integer sum;
    ``l2_sensitivity`` (>= 1) and ``l1_sensitivity`` (>= l2): norms of one unit's largest
    contribution to that sum, integer units; ``sample_rate``: the unit's own Poisson rate.
    """

    mu: float
    l2_sensitivity: float
    l1_sensitivity: float
    sample_rate: float
    count: int
    unit: str = "record"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", _check_positive(self.mu, "mu"))
        l2 = _check_positive(self.l2_sensitivity, "l2_sensitivity")
        if l2 < 1.0:
            raise AccountingInputError(f"l2_sensitivity must be >= 1 (integer units), got {l2!r}")
        l1 = _check_positive(self.l1_sensitivity, "l1_sensitivity")
        if l1 < l2:
            raise AccountingInputError(f"l1_sensitivity must be >= l2_sensitivity ({l2!r}), got {l1!r}")
        object.__setattr__(self, "l2_sensitivity", l2)
        object.__setattr__(self, "l1_sensitivity", l1)
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        object.__setattr__(self, "count", _check_count(self.count))
        object.__setattr__(self, "unit", _check_unit(self.unit))


Event = Union[PoissonGaussianEvent, GaussianEvent, FixedSizeGaussianEvent, PoissonSkellamEvent]
EVENT_TYPES = (PoissonGaussianEvent, GaussianEvent, FixedSizeGaussianEvent, PoissonSkellamEvent)
GAUSSIAN_TYPES = (PoissonGaussianEvent, GaussianEvent, FixedSizeGaussianEvent)

_TYPE_NAMES: dict[type, str] = {
    PoissonGaussianEvent: "poisson_gaussian",
    GaussianEvent: "gaussian",
    FixedSizeGaussianEvent: "fixed_size_gaussian",
    PoissonSkellamEvent: "poisson_skellam",
}
_CLASSES = {name: cls for cls, name in _TYPE_NAMES.items()}
_FIELDS = {
    "poisson_gaussian": ("noise_multiplier", "sample_rate", "count", "unit"),
    "gaussian": ("noise_multiplier", "count", "unit"),
    "fixed_size_gaussian": ("noise_multiplier", "sample_rate", "count", "unit"),
    "poisson_skellam": ("mu", "l2_sensitivity", "l1_sensitivity", "sample_rate", "count", "unit"),
}


def check_event(event: Any, *, name: str = "event") -> Event:
    """Return ``event`` if it is one of the event classes, else raise AccountingInputError."""
    if not isinstance(event, EVENT_TYPES):
        raise AccountingInputError(
            f"{name} must be a PoissonGaussianEvent, GaussianEvent, FixedSizeGaussianEvent or PoissonSkellamEvent, "
            f"got {type(event).__name__}"
        )
    return event


def event_to_dict(event: Event) -> dict[str, Any]:
    """Serialise an event to a JSON-ready dict with a ``"type"`` key."""
    check_event(event)
    type_name = _TYPE_NAMES[type(event)]
    return {"type": type_name, **{field: getattr(event, field) for field in _FIELDS[type_name]}}


def event_from_dict(data: Any) -> Event:
    """Rebuild an event from :func:`event_to_dict`'s output; validates every field."""
    if not isinstance(data, dict):
        raise AccountingInputError(f"event must be a JSON object, got {type(data).__name__}")
    type_name = data.get("type")
    if type_name not in _CLASSES:
        raise AccountingInputError(
            f"event type must be one of {', '.join(sorted(_CLASSES))}, got {type_name!r}"
        )
    expected = set(_FIELDS[type_name])
    given = set(data) - {"type"}
    if given - expected:
        raise AccountingInputError(
            f"{type_name} event has unknown field(s) {sorted(given - expected)}; "
            f"allowed: {sorted(expected)}"
        )
    required = expected - {"unit"} - ({"count"} if type_name == "gaussian" else set())
    if required - given:
        raise AccountingInputError(f"{type_name} event is missing field(s) {sorted(required - given)}")
    return _CLASSES[type_name](**{key: data[key] for key in given})


def privacy_unit(events: Any) -> str | None:
    """The one privacy unit shared by ``events`` (None if empty); raise if they mix units."""
    units = {check_event(event, name="events[i]").unit for event in events}
    if len(units) > 1:
        raise AccountingInputError(
            f"events must share one privacy unit to be composed, got units {sorted(units)}"
        )
    return units.pop() if units else None


def dominating_event(event: Event) -> PoissonGaussianEvent | GaussianEvent:
    """An event whose privacy profile dominates ``event``'s; identity for Poisson/Gaussian events.

    Fixed-size sampling without replacement (batch b of n units, q = b/n) under the
    add/remove relation: couple the batches drawn from D and D + {x} so that they differ
    by replacing at most one unit, which happens with probability b/(n+1) <= q. Each
    coupled pair of outputs is then N(m, s^2) against (1-q') N(m, s^2) + q' N(m', s^2)
    with |m - m'| <= 2 * clip (a replacement moves the clipped sum by up to twice the
    clip). The hockey-stick divergence is jointly convex, grows with q' and with
    |m - m'|, so the whole mechanism is dominated by the Poisson-subsampled Gaussian with
    rate q and noise multiplier sigma / 2, in both orders. This is sound for both PRV and
    RDP accounting but conservative: sampling without replacement is not amplified as
    well as Poisson sampling under add/remove (cf. Lebeda et al. 2024, arXiv 2405.20769).
    Wang, Balle, Kasiviswanathan (AISTATS 2019, arXiv 1808.00087, Thm 9) analyse the
    same sampler under the replace-one relation instead, a different guarantee we do
    not mix with add/remove events.
    """
    check_event(event)
    if isinstance(event, PoissonSkellamEvent):
        raise AccountingInputError("a PoissonSkellamEvent has no Gaussian equivalent: compose it with "
                                   "accounting.skellam.composed_epsilon (accounting.prv.epsilon dispatches to it)")
    if isinstance(event, FixedSizeGaussianEvent):
        return PoissonGaussianEvent(
            noise_multiplier=event.noise_multiplier / 2.0,
            sample_rate=event.sample_rate,
            count=event.count,
            unit=event.unit,
        )
    return event


def mechanism_counts(events: Any) -> list[tuple[float, float, int]]:
    """Merge identical mechanisms: sorted ``(noise_multiplier, sample_rate, count)`` triples.

    Events go through :func:`dominating_event`; a Gaussian event is a Poisson event with
    ``sample_rate = 1``. Raises if the events mix privacy units.
    """
    events = list(events)
    privacy_unit(events)
    merged: dict[tuple[float, float], int] = {}
    for event in events:
        reduced = dominating_event(event)
        rate = reduced.sample_rate if isinstance(reduced, PoissonGaussianEvent) else 1.0
        key = (reduced.noise_multiplier, rate)
        merged[key] = merged.get(key, 0) + reduced.count
    return sorted((sigma, rate, count) for (sigma, rate), count in merged.items())
