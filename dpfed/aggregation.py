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


def clip_update(delta: dict[str, torch.Tensor], *, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``delta`` to L2 norm at most ``clip`` (norm over all tensors together); return it and its norm."""
    norm = float(torch.sqrt(sum(d.double().pow(2).sum() for d in delta.values())))
    factor = min(1.0, clip / (norm + 1e-12))
    return {n: d * factor for n, d in delta.items()}, norm


class ClientLevelDP:
    """DP-FedAvg around an aggregator (McMahan et al., ICLR 2018, arXiv 1710.06963, Alg. 1, fixed denominator).

    Each client's update ``Δ_i = state_i - global`` (R and head together) is clipped to L2 norm
    ``clip`` = S; the server adds N(0, σ² S²) to every coordinate of ``Σ_i clip(Δ_i)`` and divides by
    the *expected* number of clients ``q·N`` (not the realised one, whose value would itself leak).
    The sum has sensitivity S for adding or removing one client, so with clients sampled
    independently at rate q (Poisson) one round is the Poisson-subsampled Gaussian mechanism
    with noise multiplier σ and rate q, for the client as the unit of privacy. The guarantee
    needs a trusted aggregator: the server sees the clipped, un-noised updates.

    The wrapped aggregator computes the mean of the clipped states (so it must weight clients
    equally: size weights would change the sensitivity); this layer turns it back into the sum.
    """

    method = "dp-fedavg"

    def __init__(self, aggregator, *, clip: float, noise_multiplier: float, expected_clients: float,
                 generator: torch.Generator) -> None:
        if not (clip > 0 and clip < float("inf")):
            raise ValueError(f"client clip must be a finite number > 0, got {clip!r}")
        if not (noise_multiplier >= 0 and noise_multiplier < float("inf")):
            raise ValueError(f"client noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if not expected_clients > 0:
            raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
        if getattr(aggregator, "weighting", "uniform") != "uniform":
            raise ValueError("client-level DP needs an aggregator with uniform weighting "
                             f"(size weights change the sensitivity), got {aggregator.weighting!r}")
        self.original_aggregator = aggregator
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = float(expected_clients)
        self.generator = generator
        self.last_norms: list[float] = []

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int], *,
                  global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New global state: ``global + (Σ_i clip(state_i - global) + N(0, σ²S² I)) / (q N)``."""
        names = sorted(global_state)
        clipped, norms = [], []
        for s in states:
            if set(s) != set(names):
                raise ValueError("all client states must carry the global state's parameter names")
            d, norm = clip_update({n: s[n].double() - global_state[n].double() for n in names}, clip=self.clip)
            clipped.append(d)
            norms.append(norm)
        self.last_norms = norms
        if clipped:  # the wrapped aggregator's mean of clipped states, turned back into a sum
            zero = {n: torch.zeros_like(global_state[n], dtype=torch.float64) for n in names}
            mean = self.original_aggregator.aggregate([{n: zero[n] + d[n] for n in names} for d in clipped],
                                                      list(num_examples))
            total = {n: mean[n].double() * len(clipped) for n in names}
        else:  # nobody sampled: the server still releases noise, as the accounting assumes
            total = {n: torch.zeros_like(global_state[n], dtype=torch.float64) for n in names}
        out = {}
        for n in names:
            noise = torch.randn(total[n].shape, generator=self.generator, device=self.generator.device,
                                dtype=torch.float64).to(total[n].device)
            noised = total[n] + noise * (self.noise_multiplier * self.clip)
            out[n] = (global_state[n].double() + noised / self.expected_clients).to(global_state[n].dtype)
        return out
