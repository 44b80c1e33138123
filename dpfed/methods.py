"""What differs between the federated LoRA methods: one class per method behind one protocol.

A method owns its adapted layers (in the shared model) and knows: how to inject them
(:meth:`Method.inject`), the effective update each layer adds to its pretrained weight,
which frozen tensors a checkpoint must keep, how the server aggregates (and folds), what a
client does with the server's message, and how to export. Its static facts (what it trains,
uploads and downloads, whether it folds) are its :attr:`Method.spec`
(``dpfed.method_specs``, torch-free, which ``dpfed.comm`` and ``dpfed.config`` read).

Client training (DP-SGD on whatever the model's trainable parameters are) and accounting are
the same for every method, so the same (ε, δ) means the same noise multiplier, sample rate and
steps for all of them.

The registry :data:`METHODS` maps each name to its class::

    cls = method_class(cfg.train.method)
    adapters = cls.inject(model, names, rank=r, alpha=cfg.model.lora_alpha, generator=g)
    method = cls.build(model, adapters, weighting="size", seed=seed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dpfed.adapters import lora
from dpfed.adapters.export import export_adapters, export_lora
from dpfed.adapters.lorasb import LoRASBLinear, load_trainable_state
from dpfed.aggregation import (
    Aggregate,
    FedSBAggregator,
    FedSBExactCheck,
    FoldResidual,
    FoldStack,
    LoRAAggregator,
    LoRALayerKeys,
    SendMean,
    ServerStep,
)
from dpfed.errors import ConfigError
from dpfed.method_specs import METHOD_NAMES, SPECS, MethodSpec, method_spec
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.payload import FRAMING_BYTES


def _seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Method(Protocol):
    """One federated LoRA method bound to a model and its adapted layers.

    Class level: ``spec`` (the static facts), ``inject`` (adapt the named ``nn.Linear``
    modules of a model, returning name → layer) and ``build`` (the method object over them).
    """

    spec: ClassVar[MethodSpec]
    name: ClassVar[str]
    model: nn.Module
    layers: dict[str, nn.Module]

    @classmethod
    def inject(cls, model: nn.Module, names: Sequence[str], *, rank: int, alpha: float | None,
               generator: torch.Generator) -> dict[str, nn.Module]: ...

    @classmethod
    def build(cls, model: nn.Module, adapters: dict[str, nn.Module], *, weighting: str, seed: int) -> Method: ...

    def effective_deltas(self) -> dict[str, torch.Tensor]: ...

    def frozen_state(self) -> dict[str, torch.Tensor]: ...

    def load_frozen_state(self, frozen: dict[str, torch.Tensor]) -> None: ...

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int], *,
                  round: int) -> Aggregate: ...  # noqa: A002

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None: ...  # noqa: A002

    def payload_formula(self, trainable: int) -> str: ...

    def export(self, out_dir: Path, *, task: str, base_model: str) -> None: ...


# --------------------------------------------------------------------------- Fed-SB


class FedSB:
    """LoRA-SB layers (B, A frozen and shared, R trained); the mean of R is exact."""

    spec: ClassVar[MethodSpec] = SPECS["fed-sb"]
    name: ClassVar[str] = spec.name

    def __init__(self, model: nn.Module, adapters: dict, *, weighting: str) -> None:
        self.model, self.layers, self.weighting = model, adapters, weighting

    @classmethod
    def inject(cls, model: nn.Module, names: Sequence[str], *, rank: int, alpha: float | None = None,
               generator: torch.Generator | None = None) -> dict[str, LoRASBLinear]:
        """LoRA-SB layers with scale 1 (B, A, R zero until the init strategy sets them).

        ``alpha`` and ``generator`` are not used: Fed-SB's scale is 1 and its factors come from
        the server's init strategy (``dpfed.adapters.init``), not from PEFT's seeded init.
        """
        return inject_lorasb(model, list(names), rank=rank)

    @classmethod
    def build(cls, model: nn.Module, adapters: dict, *, weighting: str, seed: int | None = None) -> FedSB:
        return cls(model, adapters, weighting=weighting)

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
        load_trainable_state(self.model, down)

    def payload_formula(self, trainable: int) -> str:
        r2 = sum(layer.rank ** 2 for layer in self.layers.values())
        return f"4*(sum r^2 = {r2} + head {trainable - r2}) + framing {FRAMING_BYTES}"

    def export(self, out_dir: Path, *, task: str, base_model: str) -> None:
        export_adapters(self.model, self.layers, out_dir, task=task, base_model=base_model)


def _r_key(model: nn.Module, layer: nn.Module) -> str:
    for n, p in model.named_parameters():
        if p is layer.R:
            return n
    raise KeyError("LoRA-SB layer's R is not a parameter of the model")


# --------------------------------------------------------------------------- LoRA baselines


class _LoRABaseline:
    """What FedIT, FFA-LoRA, FedEx-LoRA and FLoRA share, on PEFT LoRA layers (``dpfed.adapters.lora``).

    A subclass sets ``spec`` and, where its server differs from sending the mean, overrides
    :meth:`server_step` and :meth:`client_apply`. Whether A is trained and whether W0 is
    folded (and so checkpointed) come from the spec.
    """

    spec: ClassVar[MethodSpec]
    name: ClassVar[str]

    def __init__(self, model: nn.Module, layers: dict, *, weighting: str, seed: int) -> None:
        self.model, self.layers, self.weighting, self.seed = model, layers, weighting, seed
        self.initial_base = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
        self._keys = {n: lora.param_names(n) for n in layers}

    @classmethod
    def inject(cls, model: nn.Module, names: Sequence[str], *, rank: int, alpha: float | None,
               generator: torch.Generator) -> dict[str, nn.Module]:
        """PEFT LoRA layers, scaling ``alpha / rank`` (``alpha`` None: ``rank``), A from ``generator``, B = 0."""
        for n in names:
            d_out, d_in = model.get_submodule(n).weight.shape
            if rank > min(d_out, d_in):
                raise ConfigError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)} of {n}, got {rank}")
        return lora.inject_lora(model, names, rank=rank, alpha=float(rank) if alpha is None else alpha,
                                train_a=cls.spec.trains_a, generator=generator)

    @classmethod
    def build(cls, model: nn.Module, adapters: dict, *, weighting: str, seed: int) -> _LoRABaseline:
        return cls(model, adapters, weighting=weighting, seed=seed)

    @property
    def folds(self) -> bool:
        return self.spec.folds

    def effective_deltas(self) -> dict[str, torch.Tensor]:
        """(W0_now − W0_pretrained) + (alpha/r) · B A per layer: everything the method added."""
        return {n: (layer.get_base_layer().weight.detach().float() - self.initial_base[n].float()
                    + lora.lora_delta(layer)).cpu() for n, layer in self.layers.items()}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Folded W0 (methods that fold) and the shared frozen A (methods that do not train A)."""
        out = {}
        for name, layer in self.layers.items():
            if self.spec.folds:
                out[f"{name}.W0"] = layer.get_base_layer().weight
            if not self.spec.trains_a:
                out[f"{name}.A"] = lora.factors(layer)[1]
        return out

    def load_frozen_state(self, frozen: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                if self.spec.folds:
                    w = layer.get_base_layer().weight
                    w.copy_(frozen[f"{name}.W0"].to(w))
                if not self.spec.trains_a:
                    a = lora.factors(layer)[1]
                    a.copy_(frozen[f"{name}.A"].to(a))

    def _layer_keys(self) -> dict[str, LoRALayerKeys]:
        out = {}
        for name, layer in self.layers.items():
            b_key, a_key = self._keys[name]
            frozen_a = None if self.spec.trains_a else lora.factors(layer)[1].detach()
            out[name] = LoRALayerKeys(b=b_key, a=a_key, scaling=lora.scaling(layer), frozen_a=frozen_a)
        return out

    def server_step(self, round: int) -> ServerStep:  # noqa: A002
        """What the server does after FedAvg in ``round`` (default: send the mean)."""
        return SendMean()

    def aggregate(self, states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int], *,
                  round: int) -> Aggregate:  # noqa: A002
        """Aggregate, then apply the fold to the shared model's base weights (server and clients alike)."""
        agg = LoRAAggregator(self._layer_keys(), step=self.server_step(round), weighting=self.weighting
                             ).aggregate(states, num_examples)
        for name, delta in agg.fold.items():
            lora.fold_into_base(self.layers[name], delta)
        return agg

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None:  # noqa: A002
        """A client rebuilds the server's model from the message alone (``Aggregate.down``): the mean state."""
        load_trainable_state(self.model, down)

    def payload_formula(self, trainable: int) -> str:
        n = sum(sum(t.numel() for t in lora.factors(layer) if t.requires_grad) for layer in self.layers.values())
        return f"4*(LoRA factors {n} + head {trainable - n}) + framing {FRAMING_BYTES}"

    def export(self, out_dir: Path, *, task: str, base_model: str) -> None:
        export_lora(self.model, self.layers, out_dir, method=self.name, task=task, base_model=base_model,
                    initial_base=self.initial_base)


class FedIT(_LoRABaseline):
    """FedIT (Zhang et al. 2024, arXiv 2310.15080): FedAvg of A and B (inexact)."""

    spec: ClassVar[MethodSpec] = SPECS["fedit"]
    name: ClassVar[str] = spec.name


class FFALoRA(_LoRABaseline):
    """FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): A frozen and shared, FedAvg of B (exact)."""

    spec: ClassVar[MethodSpec] = SPECS["ffa-lora"]
    name: ClassVar[str] = spec.name


class FedExLoRA(_LoRABaseline):
    """FedEx-LoRA (Singhal et al. 2024, arXiv 2410.09432, Eq. 6): FedAvg plus the residual folded into W0."""

    spec: ClassVar[MethodSpec] = SPECS["fedex-lora"]
    name: ClassVar[str] = spec.name

    def server_step(self, round: int) -> ServerStep:  # noqa: A002
        return FoldResidual()

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None:  # noqa: A002
        """The mean state, then each layer's residual (``<layer>.residual``) folded into W0."""
        residuals = {k[: -len(".residual")]: v for k, v in down.items() if k.endswith(".residual")}
        load_trainable_state(self.model, {k: v for k, v in down.items() if not k.endswith(".residual")})
        for name, delta in residuals.items():
            lora.fold_into_base(self.layers[name], delta)


class FLoRA(_LoRABaseline):
    """FLoRA (Wang et al. 2024, arXiv 2409.05976): the stacked product folded into W0, a fresh adapter each round."""

    spec: ClassVar[MethodSpec] = SPECS["flora"]
    name: ClassVar[str] = spec.name

    def server_step(self, round: int) -> ServerStep:  # noqa: A002
        return FoldStack(lambda name: self._fresh_a(name, round))

    def _fresh_a(self, name: str, round: int) -> torch.Tensor:  # noqa: A002
        """The re-initialised A for layer ``name`` after ``round``: server and every client derive it from the seed."""
        index = list(self.layers).index(name)
        a = lora.factors(self.layers[name])[1]
        return lora.kaiming_uniform(*a.shape, generator=torch.Generator().manual_seed(_seed(self.seed, 10, round, index)))

    def client_apply(self, down: dict[str, torch.Tensor], *, round: int) -> None:  # noqa: A002
        """The stacked factors' product (times the scaling) folded into W0, then A re-drawn from the
        shared round seed and B = 0; the head from the message."""
        state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        for key in state:
            if key in down:
                state[key] = down[key]
        for name, layer in self.layers.items():
            b_key, a_key = self._keys[name]
            stack = sorted({k.split(".stack.")[1].split(".")[0] for k in down if k.startswith(f"{name}.stack.")}, key=int)
            prod = sum(down[f"{name}.stack.{j}.B"].double() @ down[f"{name}.stack.{j}.A"].double() for j in stack)
            lora.fold_into_base(layer, (lora.scaling(layer) * prod).float())
            state[a_key] = self._fresh_a(name, round)
            state[b_key] = torch.zeros_like(state[b_key])
        load_trainable_state(self.model, state)


# --------------------------------------------------------------------------- registry


METHODS: Mapping[str, type[FedSB | _LoRABaseline]] = MappingProxyType(
    {cls.name: cls for cls in (FedSB, FedIT, FFALoRA, FedExLoRA, FLoRA)})
"""Every method's class by name, in display order (the same names as ``dpfed.method_specs.SPECS``)."""

if tuple(METHODS) != METHOD_NAMES:  # a method added to one registry and not the other
    raise ImportError(f"dpfed.methods.METHODS {tuple(METHODS)} must equal dpfed.method_specs.METHOD_NAMES {METHOD_NAMES}")


def method_class(name: str) -> type[FedSB | _LoRABaseline]:
    """The class of method ``name``; ``ConfigError`` naming the known methods otherwise."""
    method_spec(name)  # the one place that words the error
    return METHODS[name]


# --------------------------------------------------------------------------- old names


FedSBMethod = FedSB
"""The old name of :class:`FedSB` (kept until every caller uses the registry)."""


def LoRAMethod(name: str, model: nn.Module, layers: dict, *, weighting: str, seed: int) -> _LoRABaseline:  # noqa: N802
    """The old constructor of the LoRA baselines: ``METHODS[name].build(...)`` (kept until every caller switches)."""
    cls = method_class(name)
    if not issubclass(cls, _LoRABaseline):
        baselines = ", ".join(n for n, c in METHODS.items() if issubclass(c, _LoRABaseline))
        raise ConfigError(f"method must be a LoRA baseline ({baselines}), got {name!r}")
    return cls.build(model, layers, weighting=weighting, seed=seed)
