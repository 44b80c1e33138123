"""Server-side aggregation, one strategy per method.

Fed-SB (arXiv 2502.15436, Sec. 4): the server averages the clients' R (and the head). Since
every client shares B and A, ``B (Σ_i w_i R_i) A = Σ_i w_i B R_i A``: the average is exact.
The LoRA baselines share :class:`LoRAAggregator` (FedAvg of the factors) and differ only in the
:class:`ServerStep` their method class passes in (``dpfed.methods``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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


# --------------------------------------------------------------------------- LoRA baselines


@dataclass(frozen=True)
class LoRALayerKeys:
    """Where one adapted layer's factors live in a state, and its scaling ``alpha / r``.

    ``frozen_a`` is set when A is not trained (FFA-LoRA): then it is not in the states.
    """

    b: str
    a: str
    scaling: float
    frozen_a: torch.Tensor | None = None

    def product(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self.frozen_a if self.frozen_a is not None else state[self.a]
        return self.scaling * (state[self.b].double() @ a.double())  # (d_out, d_in)


@dataclass(frozen=True)
class Aggregate:
    """One round's server result.

    ``state``: the new global trainable state; ``fold``: layer → ΔW0 that server and clients add
    to the base weight (empty unless the method folds); ``down``: exactly what the server sends
    each client for the next round (bytes are counted from it); ``error``: the aggregation
    error ``‖Σ_i p_i ΔW_i − ΔW_global‖_F / ‖Σ_i p_i ΔW_i‖_F`` over all adapted layers, where
    ``ΔW`` is the adapter's product (plus the fold).
    """

    state: dict[str, torch.Tensor]
    fold: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]
    error: float


def _weights(num_examples: Sequence[int], weighting: str) -> list[float]:
    if weighting not in ("size", "uniform"):
        raise ValueError(f"weighting must be 'size' or 'uniform', got {weighting!r}")
    w = [float(n) for n in num_examples] if weighting == "size" else [1.0] * len(num_examples)
    total = sum(w)
    return [x / total for x in w]


def aggregation_error(ideal: dict[str, torch.Tensor], achieved: dict[str, torch.Tensor]) -> float:
    """``‖ideal − achieved‖_F / ‖ideal‖_F`` over all layers together (0 when ideal is 0 and achieved matches)."""
    num = sum(float((ideal[n] - achieved[n]).pow(2).sum()) for n in ideal)
    den = sum(float(ideal[n].pow(2).sum()) for n in ideal)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


class ServerStep(Protocol):
    """What a LoRA baseline's server does after FedAvg: ``(state, fold, down)`` from the mean.

    Arguments: the layers' keys, the weighted mean of the states, the client states, their
    normalised weights and the ideal update ``Σ_i p_i ΔW_i`` per layer (float64). Returns the
    new global state, the per-layer ΔW0 to fold (empty if none) and the message sent down.
    """

    def __call__(self, layers: dict[str, LoRALayerKeys], mean: dict[str, torch.Tensor],
                 states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                 ideal: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]: ...


class SendMean:
    """FedIT (Zhang et al. 2024, arXiv 2310.15080) and FFA-LoRA (Sun et al. 2024, arXiv 2403.12313).

    The mean factors are the new state and the message. FedIT: the product of means is not the
    mean of products, so the aggregation error is non-zero. FFA-LoRA: A is frozen and shared
    (``LoRALayerKeys.frozen_a``), so the mean of B is exact.
    """

    def __call__(self, layers, mean, states, weights, ideal):
        return mean, {}, dict(mean)


class FoldResidual:
    """FedEx-LoRA (Singhal et al. 2024, arXiv 2410.09432, Eq. 6): the mean factors plus the residual.

    The residual ``Σ p_i B_i A_i − B̄ Ā`` (times the scaling) is folded into W0 and sent down
    next to the mean state as ``<layer>.residual``.
    """

    def __call__(self, layers, mean, states, weights, ideal):
        fold = {n: (ideal[n] - k.product(mean)).float() for n, k in layers.items()}
        down = dict(mean)
        for n in layers:
            down[f"{n}.residual"] = fold[n]
        return mean, fold, down


class FoldStack:
    """FLoRA (Wang et al. 2024, arXiv 2409.05976): fold the stacked product, start a fresh adapter.

    ``Σ p_i B_i A_i`` is folded into W0; A is re-initialised by ``reinit_a(layer)`` (the shared
    round seed) and B = 0. Down: every chosen client's A and B (the stack, each client's weight
    folded into its B) and the averaged head.
    """

    def __init__(self, reinit_a: Callable[[str], torch.Tensor]) -> None:
        self.reinit_a = reinit_a

    def __call__(self, layers, mean, states, weights, ideal):
        factor_keys = {k.b for k in layers.values()} | {k.a for k in layers.values()}
        down = {key: v for key, v in mean.items() if key not in factor_keys}  # head
        state = dict(mean)
        fold = {}
        for n, k in layers.items():
            fold[n] = ideal[n].float()
            for i, s in enumerate(states):
                down[f"{n}.stack.{i}.B"] = (s[k.b].double() * weights[i]).to(s[k.b].dtype)
                down[f"{n}.stack.{i}.A"] = s[k.a]
            state[k.b] = torch.zeros_like(mean[k.b])
            state[k.a] = self.reinit_a(n).to(mean[k.a])
        return state, fold, down


class LoRAAggregator:
    """FedAvg over PEFT LoRA factors and the head (see ``dpfed.adapters.lora``), then the method's step.

    ``step`` is what differs between FedIT, FFA-LoRA (:class:`SendMean`), FedEx-LoRA
    (:class:`FoldResidual`) and FLoRA (:class:`FoldStack`); each method passes its own
    (``dpfed.methods``). Non-adapter parameters (the head) are averaged.
    """

    def __init__(self, layers: dict[str, LoRALayerKeys], *, step: ServerStep, weighting: str = "size") -> None:
        self.layers, self.step, self.weighting = layers, step, weighting

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> Aggregate:
        p = _weights(num_examples, self.weighting)
        mean = weighted_mean(states, p)
        ideal = {n: sum(w * k.product(s) for s, w in zip(states, p)) for n, k in self.layers.items()}
        state, fold, down = self.step(self.layers, mean, states, p, ideal)
        achieved = {n: k.product(state) + (fold[n].double() if n in fold else 0.0) for n, k in self.layers.items()}
        return Aggregate(state, fold, down, aggregation_error(ideal, achieved))


class FedSBExactCheck:
    """Fed-SB's aggregation error, measured (not assumed): ``B mean(R_i) A`` against ``mean(B R_i A)``."""

    def __init__(self, layers: dict[str, tuple[str, torch.Tensor, torch.Tensor, float]], *, weighting: str) -> None:
        self.layers, self.weighting = layers, weighting  # name → (R key, B, A, scale)

    def error(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int],
              mean: dict[str, torch.Tensor]) -> float:
        p = _weights(num_examples, self.weighting)

        def prod(state, key, B, A, scale):
            return scale * (B.double() @ state[key].double() @ A.double())

        ideal = {n: sum(w * prod(s, *v) for s, w in zip(states, p)) for n, v in self.layers.items()}
        return aggregation_error(ideal, {n: prod(mean, *v) for n, v in self.layers.items()})
