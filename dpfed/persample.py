"""Per-sample gradients without hooks: modules that take a (batch, ...) view of their parameters.

DP-SGD (Abadi et al. 2016, arXiv 1607.00133, Algorithm 1) clips each example's gradient, so a
step needs one gradient per example, not their sum. Here a module that owns trainable parameters
derives from :class:`PerSampleModule`: for one forward/backward, :func:`per_sample_mode` hands it a
(batch, *shape) leaf per trainable parameter (a stride-0 expanded view of the parameter: no copy),
its forward computes example b with leaf[b], and autograd's backward of the batched ops returns a
dense (batch, *shape) gradient in ``leaf.grad``. Nothing is hung on the parameters
(no ``p.grad_sample``), no hook runs over frozen weights, and frozen weights never get a gradient.

:func:`per_sample_mode` refuses a model with a trainable parameter that no
:class:`PerSampleModule` owns directly: it would silently get no per-sample gradient (opacus
issue 820). :func:`per_sample_weight_mode` gives a module a zero (batch, d_out, d_in) leaf added to
a frozen weight, whose gradient is each example's gradient with respect to that weight (what a DP
initialisation clips and noises).

This module knows no adapter: :class:`PerSampleLinear` is the generic trainable linear map (a
classification head, PEFT's ``lora_A``/``lora_B``); LoRA-SB's layer is in
:mod:`dpfed.adapters.lorasb`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from dpfed.errors import PrivacyCheckError


class PerSampleModule(nn.Module):
    """Base of modules that compute example b of a batch with a per-sample leaf of each trainable parameter.

    Between :meth:`set_per_sample` calls made by :func:`per_sample_mode`, :attr:`per_sample` is a
    dict of local parameter name → (batch, *shape) leaf, one per *trainable* parameter the module
    registers itself (frozen ones are absent and stay shared); otherwise it is None and the
    module's forward uses its parameters as usual. A subclass reads :attr:`per_sample` in
    ``forward``. Modules that support :func:`per_sample_weight_mode` override
    :attr:`frozen_weight` and read :attr:`weight_leaf`.
    """

    per_sample: dict[str, torch.Tensor] | None = None
    weight_leaf: torch.Tensor | None = None  # (B, d_out, d_in) zero leaf: DP initialisation only

    def set_per_sample(self, leaves: dict[str, torch.Tensor] | None) -> None:
        """Use ``leaves`` (local name → (batch, *shape) leaf) in ``forward``; None returns to the shared parameters."""
        self.per_sample = leaves

    @property
    def frozen_weight(self) -> torch.Tensor:
        """The frozen (d_out, d_in) weight whose per-example gradient :func:`per_sample_weight_mode` asks for."""
        raise TypeError(f"{type(self).__name__} has no frozen weight for per_sample_weight_mode")

    def set_weight_leaf(self, leaf: torch.Tensor | None) -> None:
        """Add ``leaf[b] @ x_b`` to example b's output (``leaf`` is zero, so only its gradient matters); None: stop."""
        self.weight_leaf = leaf


def expand_leaf(p: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A (batch, *p.shape) stride-0 view of ``p`` that is its own autograd leaf (its gradient is dense)."""
    return p.detach().unsqueeze(0).expand(batch_size, *p.shape).requires_grad_(True)


class PerSampleLinear(PerSampleModule, nn.Linear):
    """A trainable linear map (a classification head, or PEFT's ``lora_A``/``lora_B``) with per-sample gradients.

    An ``nn.Linear`` (same ``weight``/``bias`` names and shapes, so PEFT's code that reads
    ``lora_A[...].weight`` keeps working) whose forward, in per-sample mode, uses
    (batch, d_out, d_in) and (batch, d_out) views of its parameters, so autograd returns one
    gradient per example. Inputs are (batch, d_in) or (batch, ..., d_in). Parameters start at
    zero (no global RNG); callers install values with :meth:`load`.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.zeros(d_out, d_in, device=device))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device)) if bias else None

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> PerSampleLinear:
        """Copy ``weight`` (and ``bias``) into the parameters; returns ``self``."""
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        leaves = self.per_sample
        if leaves is None:
            return nn.functional.linear(x, self.weight, self.bias)
        bsz = x.shape[0]
        w = leaves.get("weight")  # (B, d_out, d_in); a frozen factor (FFA-LoRA's A) is shared
        if w is None:
            w = self.weight.detach().unsqueeze(0).expand(bsz, -1, -1)
        b = None
        if self.bias is not None:
            b = leaves.get("bias")  # (B, d_out)
            if b is None:
                b = self.bias.detach().unsqueeze(0).expand(bsz, -1)
        x3 = x.unsqueeze(1) if x.dim() == 2 else x.reshape(bsz, -1, x.shape[-1])  # (B, T, d_in)
        y = torch.bmm(x3, w.transpose(1, 2))  # (B, T, d_out)
        if b is not None:
            y = y + b.unsqueeze(1)
        return y.squeeze(1) if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def per_sample_mode(model: nn.Module, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Give every trainable parameter a (batch, ...) leaf for one forward/backward.

    The leaves are stride-0 expanded views of the parameters (never written to); autograd
    still gives each a dense (batch, ...) gradient.

    Yields name → per-sample leaf tensor, named as in ``model.named_parameters()``; after
    ``backward`` of the *summed* per-example losses, ``leaf.grad[b]`` is the gradient of example
    b's loss. Raises :class:`~dpfed.errors.PrivacyCheckError` if the model has a trainable
    parameter that no :class:`PerSampleModule` registers itself (it would silently receive no
    per-sample gradient: opacus issue 820).
    """
    leaves: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    touched: list[PerSampleModule] = []
    try:
        for name, mod in model.named_modules():
            if not isinstance(mod, PerSampleModule):
                continue
            prefix = f"{name}." if name else ""
            local: dict[str, torch.Tensor] = {}
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    local[pname] = leaves[prefix + pname] = expand_leaf(p, batch_size)
                    owned.add(id(p))
            mod.set_per_sample(local)
            touched.append(mod)
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if orphans:
            raise PrivacyCheckError(
                f"trainable parameters without a per-sample gradient path: {orphans[:5]}; "
                "freeze them or wrap them in a per-sample-capable module"
            )
        yield leaves
    finally:
        for mod in touched:
            mod.set_per_sample(None)


@contextlib.contextmanager
def per_sample_weight_mode(layers: Mapping[str, PerSampleModule], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Give each layer a (batch, d_out, d_in) zero leaf added to its frozen weight.

    After ``backward`` of the summed per-example losses, ``leaf.grad[b]`` is example b's
    gradient with respect to that layer's :attr:`~PerSampleModule.frozen_weight` (``W0``) — what
    a DP initialisation clips and noises. The weights themselves stay frozen and receive no
    gradient. The leaves are stride-0 expanded views; only their gradients take
    batch × d_out × d_in memory. Yields layer name → leaf.
    """
    leaves: dict[str, torch.Tensor] = {}
    try:
        for name, layer in layers.items():
            w = layer.frozen_weight  # (d_out, d_in)
            leaf = torch.zeros((), device=w.device, dtype=torch.float32).expand(batch_size, *w.shape).requires_grad_(True)
            layer.set_weight_leaf(leaf)
            leaves[name] = leaf
        yield leaves
    finally:
        for layer in layers.values():
            layer.set_weight_leaf(None)
