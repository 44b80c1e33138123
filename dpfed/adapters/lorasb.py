"""LoRA-SB layers: ``W = W0 + s · B R A`` with ``B``, ``A`` frozen and only ``R`` (r×r) trained.

LoRA-SB (Ponkshe et al., arXiv 2411.19557, Sec. 3) and Fed-SB (Singhal et al., arXiv 2502.15436,
Sec. 4): because every client holds the same ``B`` and ``A``, the mean of ``B R_i A`` is
``B mean(R_i) A`` and averaging ``R`` is exact.

Per-sample gradients. In a DP step the layer is given a per-sample leaf of ``R`` of shape
(batch, r, r) by :func:`per_sample_mode` (a stride-0 expanded view: no copy is made). The
forward then computes ``h_b = u_b R_bᵀ`` with a batched matmul, and autograd's backward of that
matmul *is* the fused r×r einsum of REFERENCE.md:
``∂L_b/∂R_b = Σ_t (Bᵀ g_bt)(A x_bt)ᵀ = einsum('bto,bti->boi', grad_h, u)``. No hooks over
frozen weights are involved, and frozen weights never get a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class LoRASBLinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; adds ``scale · B R A x``.

    ``A`` (r, d_in) and ``B`` (d_out, r) are buffers (frozen, saved with the state dict);
    ``R`` (r, r) is the only parameter.
    """

    def __init__(self, base: nn.Linear, *, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA-SB wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = scale
        d_out, d_in = base.weight.shape
        dev = base.weight.device
        self.register_buffer("A", torch.zeros(rank, d_in, device=dev, dtype=torch.float32))
        self.register_buffer("B", torch.zeros(d_out, rank, device=dev, dtype=torch.float32))
        self.R = nn.Parameter(torch.zeros(rank, rank, device=dev, dtype=torch.float32))
        self._per_sample_R: torch.Tensor | None = None
        self._per_sample_dW: torch.Tensor | None = None  # (B, d_out, d_in) zero leaf: DP initialisation only

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_factors(self, *, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor) -> None:
        """Install B, A (frozen) and R (trainable), in fp32."""
        with torch.no_grad():
            self.B.copy_(B.to(self.B))
            self.A.copy_(A.to(self.A))
            self.R.copy_(R.to(self.R))

    def delta_weight(self) -> torch.Tensor:
        """``scale · B R A`` (d_out, d_in), the update this layer adds to ``W0``."""
        return self.scale * (self.B @ self.R @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmul casts x itself; an explicit fp32 copy of x would add two
            # (B, T, d_in) casts per layer in the forward and two more in the backward.
            x = x.to(self.A.dtype)
        u = x @ self.A.T  # (..., r)
        ps = self._per_sample_R
        if ps is None:
            h = u @ self.R.T  # (..., r)
        else:
            squeeze = u.dim() == 2
            u3 = u.unsqueeze(1) if squeeze else u.reshape(u.shape[0], -1, self.rank)  # (B, T, r)
            h = torch.bmm(u3, ps.transpose(1, 2))  # (B, T, r); backward gives einsum('bto,bti->boi')
            h = h.squeeze(1) if squeeze else h.reshape(u.shape)
        delta = h @ self.B.T  # (..., d_out)
        if self.scale != 1.0:
            delta = delta * self.scale
        dw = self._per_sample_dW
        if dw is not None:  # y_b += ΔW_b x_b with ΔW_b = 0: its gradient is example b's ∂L_b/∂W0 = Σ_t g_bt x_btᵀ
            x3 = x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
            extra = torch.bmm(x3.to(dw.dtype), dw.transpose(1, 2))  # (B, T, d_out)
            delta = delta + (extra.squeeze(1) if x.dim() == 2 else extra.reshape(delta.shape))
        return y + delta.to(y.dtype)


class PerSampleLinear(nn.Linear):
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
        self._per_sample: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> PerSampleLinear:
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self._per_sample is None:
            return nn.functional.linear(x, self.weight, self.bias)
        w, b = self._per_sample  # (B, d_out, d_in), (B, d_out) or None
        x3 = x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
        y = torch.bmm(x3, w.transpose(1, 2))  # (B, T, d_out)
        if b is not None:
            y = y + b.unsqueeze(1)
        return y.squeeze(1) if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


def adapter_modules(model: nn.Module) -> dict[str, LoRASBLinear]:
    """Name → LoRA-SB layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRASBLinear)}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name → detached copy of every trainable parameter (the federated payload)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise ValueError(f"trainable state mismatch: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"shape of {n} must be {tuple(p.shape)}, got {tuple(state[n].shape)}")
            p.copy_(state[n].to(p))


@contextlib.contextmanager
def per_sample_mode(model: nn.Module, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Give every trainable parameter a (batch, ...) leaf for one forward/backward.

    The leaves are stride-0 expanded views of the parameters (never written to); autograd
    still gives each a dense (batch, ...) gradient.

    Yields name → per-sample leaf tensor; after ``backward`` of the *summed* per-example
    losses, ``leaf.grad[b]`` is the gradient of example b's loss. Raises if the model has a
    trainable parameter that no per-sample-capable module owns (it would silently receive no
    per-sample gradient: opacus issue 820).
    """
    leaves: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    touched: list[nn.Module] = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, LoRASBLinear):
                # a stride-0 view of R, not a copy (saves B·r² floats per layer); grads are still (B, r, r)
                leaf = mod.R.detach().unsqueeze(0).expand(batch_size, -1, -1).requires_grad_(True)
                mod._per_sample_R = leaf
                leaves[f"{name}.R" if name else "R"] = leaf
                owned.add(id(mod.R))
                touched.append(mod)
            elif isinstance(mod, PerSampleLinear):
                prefix = f"{name}." if name else ""
                w = b = None
                if mod.weight.requires_grad:  # a frozen factor (FFA-LoRA's A) stays shared, no leaf
                    w = mod.weight.detach().unsqueeze(0).expand(batch_size, -1, -1).requires_grad_(True)
                    leaves[prefix + "weight"] = w
                    owned.add(id(mod.weight))
                else:
                    w = mod.weight.detach().unsqueeze(0).expand(batch_size, -1, -1)
                if mod.bias is not None:
                    b = mod.bias.detach().unsqueeze(0).expand(batch_size, -1)
                    if mod.bias.requires_grad:
                        b = b.requires_grad_(True)
                        leaves[prefix + "bias"] = b
                        owned.add(id(mod.bias))
                mod._per_sample = (w, b)
                touched.append(mod)
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if orphans:
            from dpfed.errors import PrivacyCheckError

            raise PrivacyCheckError(
                f"trainable parameters without a per-sample gradient path: {orphans[:5]}; "
                "freeze them or wrap them in a per-sample-capable module"
            )
        yield leaves
    finally:
        for mod in touched:
            if isinstance(mod, LoRASBLinear):
                mod._per_sample_R = None
            else:
                mod._per_sample = None


@contextlib.contextmanager
def per_sample_weight_mode(adapters: dict[str, LoRASBLinear], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Give each adapted layer a (batch, d_out, d_in) zero leaf added to its frozen weight.

    After ``backward`` of the summed per-example losses, ``leaf.grad[b]`` is example b's
    gradient with respect to that layer's base weight ``W0`` — what a DP initialisation clips
    and noises. The weights themselves stay frozen and receive no gradient. The leaves are
    stride-0 expanded views; only their gradients take batch × d_out × d_in memory.
    """
    leaves: dict[str, torch.Tensor] = {}
    try:
        for name, layer in adapters.items():
            w = layer.base.weight
            leaf = torch.zeros((), device=w.device, dtype=torch.float32).expand(
                batch_size, layer.out_features, layer.in_features).requires_grad_(True)
            layer._per_sample_dW = leaf
            leaves[name] = leaf
        yield leaves
    finally:
        for layer in adapters.values():
            layer._per_sample_dW = None


def orthonormal(rows: int, cols: int, *, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) from a seeded Gaussian QR."""
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


