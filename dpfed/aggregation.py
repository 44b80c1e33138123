"""Server-side aggregation, one strategy per method.

Fed-SB (arXiv 2502.15436, Sec. 4): the server averages the clients' R (and the head). Since
every client shares B and A, ``B (Σ_i w_i R_i) A = Σ_i w_i B R_i A``: the average is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i · state_i with weights normalised to sum to 1."""
    if not states:
        raise ValueError("aggregation needs at least one client state, got 0")
    if len(states) != len(weights):
        raise ValueError(f"weights must have one entry per state ({len(states)}), got {len(weights)}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {total}")
    names = set(states[0])
    for s in states[1:]:
        if set(s) != names:
            raise ValueError("all client states must carry the same parameter names")
    return {
        n: sum((w / total) * s[n].double() for s, w in zip(states, weights)).to(states[0][n].dtype)
        for n in sorted(names)
    }


class FedSBAggregator:
    """Average R and head: weighted by client size (``size``) or not (``uniform``)."""

    method = "fed-sb"

    def __init__(self, *, weighting: str = "size") -> None:
        if weighting not in ("size", "uniform"):
            raise ValueError(f"weighting must be 'size' or 'uniform', got {weighting!r}")
        self.weighting = weighting

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
        weights = [float(n) for n in num_examples] if self.weighting == "size" else [1.0] * len(states)
        return weighted_mean(states, weights)
