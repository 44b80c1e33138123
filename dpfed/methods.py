"""What differs between the federated LoRA methods, behind one interface the runner uses.

A method owns its adapted layers (in the shared model) and knows: the effective update each
layer adds to its pretrained weight, which frozen tensors a checkpoint must keep, how the
server aggregates (and folds), and how to export. Client training (DP-SGD on whatever the
model's trainable parameters are) and accounting are the same for every method, so the same
(ε, δ) means the same noise multiplier, sample rate and steps for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpfed.aggregation import Aggregate, FedSBAggregator, FedSBExactCheck, LoRAAggregator, LoRALayerKeys
from dpfed.payload import FRAMING_BYTES


def _seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


class FedSBMethod:
    """LoRA-SB layers (B, A frozen and shared, R trained); the mean of R is exact."""

    name = "fed-sb"

    def __init__(self, model: nn.Module, adapters: dict, *, weighting: str) -> None:
        self.model, self.layers, self.weighting = model, adapters, weighting

    def effective_deltas(self) -> dict[str, torch.Tensor]:
        return {n: layer.delta_weight().detach().float().cpu() for n, layer in self.layers.items()}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.B"] = layer.B
            out[f"{name}.A"] = layer.A
        return out

    def load_frozen_state(self, frozen: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            layer.set_factors(B=frozen[f"{name}.B"], A=frozen[f"{name}.A"], R=layer.R.detach())

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int], *,
                  round: int) -> Aggregate:  # noqa: A002
        mean = FedSBAggregator(weighting=self.weighting).aggregate(states, num_examples)
        check = FedSBExactCheck({n: (_r_key(self.model, layer), layer.B, layer.A, layer.scale)
                                 for n, layer in self.layers.items()}, weighting=self.weighting)
        return Aggregate(mean, {}, dict(mean), check.error(states, num_examples, mean))

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None:  # noqa: A002
        """A client installs the server's message (the mean state)."""
        from dpfed.adapters.lorasb import load_trainable_state

        load_trainable_state(self.model, down)

    def payload_formula(self, trainable: int) -> str:
        r2 = sum(layer.rank ** 2 for layer in self.layers.values())
        return f"4*(sum r^2 = {r2} + head {trainable - r2}) + framing {FRAMING_BYTES}"

    def export(self, out_dir: Path, *, task: str, base_model: str) -> None:
        from dpfed.adapters.export import export_adapters

        export_adapters(self.model, self.layers, out_dir, task=task, base_model=base_model)


def _r_key(model: nn.Module, layer: nn.Module) -> str:
    for n, p in model.named_parameters():
        if p is layer.R:
            return n
    raise KeyError("LoRA-SB layer's R is not a parameter of the model")


class LoRAMethod:
    """FedIT, FFA-LoRA, FedEx-LoRA, FLoRA on PEFT LoRA layers (``dpfed.adapters.lora``)."""

    def __init__(self, name: str, model: nn.Module, layers: dict, *, weighting: str, seed: int) -> None:
        from dpfed.adapters.lora import param_names

        self.name, self.model, self.layers, self.weighting, self.seed = name, model, layers, weighting, seed
        self.initial_base = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
        self._keys = {n: param_names(n) for n in layers}

    @property
    def folds(self) -> bool:
        return self.name in ("fedex-lora", "flora")

    def effective_deltas(self) -> dict[str, torch.Tensor]:
        """(W0_now − W0_pretrained) + (alpha/r) · B A per layer: everything the method added."""
        from dpfed.adapters.lora import lora_delta

        return {n: (layer.get_base_layer().weight.detach().float() - self.initial_base[n].float()
                    + lora_delta(layer)).cpu() for n, layer in self.layers.items()}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        from dpfed.adapters.lora import factors

        out = {}
        for name, layer in self.layers.items():
            if self.folds:
                out[f"{name}.W0"] = layer.get_base_layer().weight
            if self.name == "ffa-lora":
                out[f"{name}.A"] = factors(layer)[1]
        return out

    def load_frozen_state(self, frozen: dict[str, torch.Tensor]) -> None:
        from dpfed.adapters.lora import factors

        with torch.no_grad():
            for name, layer in self.layers.items():
                if self.folds:
                    w = layer.get_base_layer().weight
                    w.copy_(frozen[f"{name}.W0"].to(w))
                if self.name == "ffa-lora":
                    a = factors(layer)[1]
                    a.copy_(frozen[f"{name}.A"].to(a))

    def _layer_keys(self) -> dict[str, LoRALayerKeys]:
        from dpfed.adapters.lora import factors, scaling

        out = {}
        for name, layer in self.layers.items():
            b_key, a_key = self._keys[name]
            frozen_a = factors(layer)[1].detach() if self.name == "ffa-lora" else None
            out[name] = LoRALayerKeys(b=b_key, a=a_key, scaling=scaling(layer), frozen_a=frozen_a)
        return out

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int], *,
                  round: int) -> Aggregate:  # noqa: A002
        """Aggregate, then apply the fold to the shared model's base weights (server and clients alike)."""
        from dpfed.adapters.lora import fold_into_base

        agg = LoRAAggregator(self.name, self._layer_keys(), weighting=self.weighting,
                             reinit_a=(lambda name: self._fresh_a(name, round)) if self.name == "flora" else None
                             ).aggregate(states, num_examples)
        for name, delta in agg.fold.items():
            fold_into_base(self.layers[name], delta)
        return agg

    def _fresh_a(self, name: str, round: int) -> torch.Tensor:  # noqa: A002
        """FLoRA's re-initialised A for layer ``name`` after ``round``: server and every client derive it from the seed."""
        from dpfed.adapters.lora import factors, kaiming_uniform

        index = list(self.layers).index(name)
        a = factors(self.layers[name])[1]
        return kaiming_uniform(*a.shape, generator=torch.Generator().manual_seed(_seed(self.seed, 10, round, index)))

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None:  # noqa: A002
        """A client rebuilds the server's model from the message alone (``Aggregate.down``).

        fedit/ffa-lora: the mean state. fedex-lora: the mean state and each layer's residual,
        folded into W0. flora: the stacked factors, whose product (times the scaling) is folded
        into W0, then A re-drawn from the shared round seed and B = 0; the head from the message.
        """
        from dpfed.adapters.lora import fold_into_base, scaling
        from dpfed.adapters.lorasb import load_trainable_state

        if self.name == "flora":
            state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            for key in state:
                if key in down:
                    state[key] = down[key]
            for name, layer in self.layers.items():
                b_key, a_key = self._keys[name]
                stack = sorted({k.split(".stack.")[1].split(".")[0] for k in down if k.startswith(f"{name}.stack.")}, key=int)
                prod = sum(down[f"{name}.stack.{j}.B"].double() @ down[f"{name}.stack.{j}.A"].double() for j in stack)
                fold_into_base(layer, (scaling(layer) * prod).float())
                state[a_key] = self._fresh_a(name, round)
                state[b_key] = torch.zeros_like(state[b_key])
            load_trainable_state(self.model, state)
            return
        residuals = {k[: -len(".residual")]: v for k, v in down.items() if k.endswith(".residual")}
        load_trainable_state(self.model, {k: v for k, v in down.items() if not k.endswith(".residual")})
        for name, delta in residuals.items():
            fold_into_base(self.layers[name], delta)

    def payload_formula(self, trainable: int) -> str:
        from dpfed.adapters.lora import factors

        lora = sum(sum(t.numel() for t in factors(layer) if t.requires_grad) for layer in self.layers.values())
        return f"4*(LoRA factors {lora} + head {trainable - lora}) + framing {FRAMING_BYTES}"

    def export(self, out_dir: Path, *, task: str, base_model: str) -> None:
        from dpfed.adapters.export import export_lora

        export_lora(self.model, self.layers, out_dir, method=self.name, task=task, base_model=base_model,
                    initial_base=self.initial_base)
