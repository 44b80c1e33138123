"""The LoRA baselines' adapters: PEFT's LoRA layers, made per-sample capable by wrapping.

Each adapted ``nn.Linear`` becomes PEFT's ``lora.Linear`` (``W0 x + (alpha / r) · B A x``,
dropout 0), injected by ``peft.inject_adapter_in_model``. PEFT's own ``lora_A``/``lora_B``
``nn.Linear`` modules are then replaced by :class:`~dpfed.adapters.lorasb.PerSampleLinear`
(an ``nn.Linear`` subclass with the same parameter names and shapes) so that DP-SGD gets a
per-example gradient for every trainable factor; PEFT's forward, merge and save code run
unchanged. The factors are initialised from an explicit generator, as PEFT does by default
(Hu et al. 2021, arXiv 2106.09685, Sec. 4.1): ``A`` Kaiming-uniform
(U(−1/√d_in, 1/√d_in)), ``B = 0``.

Which factors each method trains (REFERENCE.md, "Baselines"):

=============  ===============  ==========================================================
method         trained          server
=============  ===============  ==========================================================
fedit          A, B             mean A, mean B (inexact: mean(B_i A_i) ≠ mean B · mean A)
ffa-lora       B (A frozen)     mean B (exact; Sun et al. 2024, arXiv 2403.12313)
fedex-lora     A, B             mean A, mean B, residual folded into W0 (Singhal et al. 2024,
                                arXiv 2410.09432, Eq. 6)
flora          A, B             Σ p_i B_i A_i folded into W0 (stacking), A, B re-initialised
                                (Wang et al. 2024, arXiv 2409.05976, Sec. 3)
=============  ===============  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dpfed.adapters.lorasb import PerSampleLinear

ADAPTER = "default"


def kaiming_uniform(d_out: int, d_in: int, *, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A init, ``kaiming_uniform_(a=√5)`` = U(−1/√d_in, 1/√d_in), from ``generator``."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(d_out, d_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def inject_lora(model: nn.Module, names: Sequence[str], *, rank: int, alpha: float, train_a: bool,
                generator: torch.Generator) -> dict[str, nn.Module]:
    """Inject PEFT LoRA into the named Linear modules; return name → PEFT ``lora.Linear``.

    Parameters that were trainable before (a classification head) stay trainable; the base
    weights stay frozen; ``A`` is trainable only when ``train_a``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(names),
                     init_lora_weights=True)
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    layers = {name: model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        d_out, d_in = base.weight.shape
        dev = base.weight.device
        a = PerSampleLinear(d_in, rank, bias=False, device=dev).load(kaiming_uniform(rank, d_in, generator=generator))
        b = PerSampleLinear(rank, d_out, bias=False, device=dev)
        a.weight.requires_grad_(train_a)
        layer.lora_A[ADAPTER] = a
        layer.lora_B[ADAPTER] = b
    for n, p in model.named_parameters():
        if n in trainable_before:
            p.requires_grad_(True)
    return layers


def scaling(layer: nn.Module) -> float:
    return float(layer.scaling[ADAPTER])


def factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of a PEFT LoRA layer: (d_out, r), (r, d_in)."""
    return layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """``(alpha / r) · B A`` (d_out, d_in): what the adapter adds to the base weight."""
    B, A = factors(layer)
    return scaling(layer) * (B.detach().float() @ A.detach().float())


def fold_into_base(layer: nn.Module, delta: torch.Tensor) -> None:
    """``W0 ← W0 + delta`` (FedEx-LoRA's residual, FLoRA's stacked product)."""
    w = layer.get_base_layer().weight
    with torch.no_grad():
        w.add_(delta.to(w))


def reinit(layer: nn.Module, *, generator: torch.Generator) -> None:
    """FLoRA's fresh adapter after folding: new random A, B = 0 (the layer's output is unchanged)."""
    B, A = factors(layer)
    with torch.no_grad():
        A.copy_(kaiming_uniform(*A.shape, generator=generator))
        B.zero_()


def param_names(name: str) -> tuple[str, str]:
    """Names of ``B`` and ``A`` in ``model.named_parameters()`` for the layer ``name``."""
    return f"{name}.lora_B.{ADAPTER}.weight", f"{name}.lora_A.{ADAPTER}.weight"
