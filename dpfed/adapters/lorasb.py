"""LoRA-SB layers: ``W = W0 + s · B R A`` with ``B``, ``A`` frozen and only ``R`` (r×r) trained.

LoRA-SB (Ponkshe et al., arXiv 2411.19557, Sec. 3) and Fed-SB (Singhal et al., arXiv 2502.15436,
Sec. 4): because every client holds the same ``B`` and ``A``, the mean of ``B R_i A`` is
``B mean(R_i) A`` and averaging ``R`` is exact.

Per-sample gradients. :class:`LoRASBLinear` is a :class:`~dpfed.persample.PerSampleModule`: in a
DP step :func:`~dpfed.persample.per_sample_mode` gives it a per-sample leaf of ``R`` of shape
(batch, r, r) (a stride-0 expanded view: no copy is made). The forward then computes
``h_b = u_b R_bᵀ`` with a batched matmul, and autograd's backward of that matmul *is* the fused
r×r einsum of REFERENCE.md:
``∂L_b/∂R_b = Σ_t (Bᵀ g_bt)(A x_bt)ᵀ = einsum('bto,bti->boi', grad_h, u)``. No hooks over
frozen weights are involved, and frozen weights never get a gradient.

The generic per-sample machinery (``PerSampleLinear``, ``per_sample_mode``,
``per_sample_weight_mode``) lives in :mod:`dpfed.persample`; the names are importable from here
too for existing callers.
"""

from __future__ import annotations

import torch
from torch import nn

from dpfed.errors import ConfigError
from dpfed.persample import (  # noqa: F401  (PerSampleLinear and the modes re-exported for existing callers)
    PerSampleLinear,
    PerSampleModule,
    per_sample_mode,
    per_sample_weight_mode,
)


class LoRASBLinear(PerSampleModule):
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

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def frozen_weight(self) -> torch.Tensor:
        """``W0`` (d_out, d_in), the frozen weight of the wrapped layer (for a DP initialisation)."""
        return self.base.weight

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
        ps = None if self.per_sample is None else self.per_sample.get("R")  # (B, r, r) or None
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
        dw = self.weight_leaf
        if dw is not None:  # y_b += ΔW_b x_b with ΔW_b = 0: its gradient is example b's ∂L_b/∂W0 = Σ_t g_bt x_btᵀ
            x3 = x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d_in)
            extra = torch.bmm(x3.to(dw.dtype), dw.transpose(1, 2))  # (B, T, d_out)
            delta = delta + (extra.squeeze(1) if x.dim() == 2 else extra.reshape(delta.shape))
        return y + delta.to(y.dtype)


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


def orthonormal(rows: int, cols: int, *, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) from a seeded Gaussian QR."""
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


def inject_lorasb(model: nn.Module, names: list[str], *, rank: int, scale: float = 1.0) -> dict[str, LoRASBLinear]:
    """Replace each named ``nn.Linear`` by a :class:`LoRASBLinear` (B, A, R zero until initialised)."""
    out = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        limit = min(base.in_features, base.out_features)
        if rank > limit:
            raise ConfigError(f"rank must be <= min(d_in, d_out) = {limit} for module '{name}', got {rank}")
        layer = LoRASBLinear(base, rank=rank, scale=scale)
        setattr(parent, child, layer)
        out[name] = layer
    return out
