"""Poisson sample rates that are exactly the inclusion probability of the draws that use them.

A uniform draw ``u = k / 2**53`` (torch's CPU float64 ``rand``, numpy's ``Generator.random``)
includes a record when ``u < q`` with probability ``ceil(q · 2**53) / 2**53``: exactly ``q``
when ``q`` lies on that grid, and up to 1.1e-16 above it otherwise. Rates are therefore
rounded *up* to the grid before they are used and recorded, so the ledger never holds a rate
below the one sampled. (A float32 draw, ``k / 2**24``, would be up to 6e-8 above.)
"""

from __future__ import annotations

import math

GRID = 2.0 ** 53

__all__ = ["GRID", "exact_rate", "sample_rate"]


def exact_rate(q: float) -> float:
    """``q`` rounded up to the 2**-53 grid of float64 uniform draws (``q`` in [0, 1])."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    return math.ceil(q * GRID) / GRID


def sample_rate(batch_size: float, n: int) -> float:
    """``q = min(1, b / n)`` on the grid: the Poisson rate for an expected batch ``b`` out of ``n`` records."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
    return exact_rate(min(1.0, batch_size / n))
