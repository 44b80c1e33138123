"""LoRA-SB initialisation strategies. None of them reads client data.

- ``random``: data-free. B and A have orthonormal columns/rows from a seeded Gaussian QR; R = 0,
  so the model starts exactly at the pretrained weights.
- ``public``: LoRA-SB's estimate of the first full fine-tuning update (arXiv 2411.19557, Sec. 3.2,
  and the reference code): ``ΔW ≈ -lr · sign(Σ_i ∇_W L_i)`` summed over public examples with the
  adapted base weights made trainable for this one pass, then a truncated SVD
  ``ΔW ≈ U_r S_r V_rᵀ`` gives ``B = U_r``, ``A = V_rᵀ``, ``R = diag(S_r)``. The records come from
  the split the config declares public.
- ``dp``: the same estimate from the clients' private records, under DP (Fed-SB, arXiv 2502.15436,
  Sec. 4 uses a shared init; the DP variant is ours): each client sends a clipped, noised sum of
  per-example gradients of the adapted base weights over a Poisson sample of its records (the
  Gaussian mechanism, an event in its ledger); the server adds the contributions and applies
  :func:`factors_from_gradient`. The client side lives in ``dpfed.client``; here only the
  server's post-processing, which sees nothing but noised sums.

A classification head is either random or fitted on the public records (frozen features,
logistic regression); fit it before ``init_public`` so that the gradient through it is informative.

Only ``dp`` reads client data, and only through the accounted mechanism.
The server computes B and A once and broadcasts them: every client holds the same factors.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from dpfed.adapters.lorasb import LoRASBLinear, orthonormal
from dpfed.data import TokenizedShard
from dpfed.model import SequenceClassifier
from dpfed.privacy import per_example_loss

log = logging.getLogger(__name__)


def randomized_svd(m: torch.Tensor, *, rank: int, generator: torch.Generator, oversample: int = 8,
                   power_iters: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``m ≈ U diag(S) Vh`` (Halko, Martinsson, Tropp 2011, arXiv 0909.4061, Alg. 4.4), fp32.

    Like ``torch.svd_lowrank`` but with an explicit generator for the test matrix.
    """
    m = m.float()
    k = min(rank + oversample, *m.shape)
    omega = torch.randn(m.shape[1], k, generator=generator, dtype=torch.float32).to(m.device)  # (d_in, k)
    q, _ = torch.linalg.qr(m @ omega)  # (d_out, k)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ q)
    u_small, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)  # (k, k), (k,), (k, d_in)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def init_random(adapters: dict[str, LoRASBLinear], *, generator: torch.Generator) -> None:
    for layer in adapters.values():
        r = layer.rank
        B = orthonormal(layer.out_features, r, generator=generator)  # (d_out, r)
        A = orthonormal(layer.in_features, r, generator=generator).T  # (r, d_in)
        layer.set_factors(B=B, A=A, R=torch.zeros(r, r))


def init_head_random(model: nn.Module, *, generator: torch.Generator) -> None:
    if isinstance(model, SequenceClassifier):
        with torch.no_grad():
            d = model.head.weight.shape[1]
            w = torch.randn(model.head.weight.shape, generator=generator) / d ** 0.5
            model.head.weight.copy_(w)
            model.head.bias.zero_()


def fit_head_public(model: SequenceClassifier, public: TokenizedShard, *, examples: int, epochs: int,
                    generator: torch.Generator, weight_decay: float = 1e-2, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """L2-regularised logistic regression of the head on frozen pooled features of public records."""
    sel = torch.randperm(len(public), generator=generator)[: min(examples, len(public))].tolist()
    public = TokenizedShard([public.ids[i] for i in sel], public.labels[sel], public.pad_id)
    feats, labels = [], []
    with torch.no_grad():
        for start in range(0, len(public), batch_size):
            b = public.batch(range(start, min(start + batch_size, len(public))), device)
            feats.append(model.pooled(b["input_ids"], b["attention_mask"]).float())
            labels.append(b["labels"])
    x = torch.cat(feats)
    y = torch.cat(labels)
    w = torch.zeros_like(model.head.weight, requires_grad=True)
    bias = torch.zeros_like(model.head.bias, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max(1, epochs))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + bias, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    if epochs > 0:
        opt.step(closure)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(bias)
        acc = float(((x @ w.T + bias).argmax(1) == y).float().mean())
    return {"head_public_examples": float(len(public)), "head_public_accuracy": acc}


def zero_factors(adapters: dict[str, LoRASBLinear]) -> None:
    """B = A = R = 0: the model is exactly the base model (gradient estimates are taken at W0)."""
    for layer in adapters.values():
        layer.set_factors(B=torch.zeros_like(layer.B), A=torch.zeros_like(layer.A), R=torch.zeros_like(layer.R))


def factors_from_gradient(adapters: dict[str, LoRASBLinear], grads: dict[str, torch.Tensor], *, lr: float,
                          generator: torch.Generator) -> None:
    """LoRA-SB's init from a summed gradient G of each adapted weight (arXiv 2411.19557, Sec. 3.2).

    ``ΔW = -lr · sign(G)`` (d_out, d_in), truncated SVD ``ΔW ≈ U_r S_r V_rᵀ``, then
    ``B = U_r``, ``A = V_rᵀ``, ``R = diag(S_r)``. Pure post-processing of ``grads``.
    """
    missing = sorted(set(adapters) - set(grads))
    if missing:
        raise ValueError(f"gradient sums missing for adapted layers {missing[:3]}")
    for name, layer in adapters.items():
        delta = -lr * torch.sign(grads[name].float())  # (d_out, d_in)
        U, S, Vh = randomized_svd(delta, rank=layer.rank, generator=generator)
        layer.set_factors(B=U, A=Vh, R=torch.diag(S))


def init_public(model: nn.Module, adapters: dict[str, LoRASBLinear], public: TokenizedShard, *, task: str,
                lr: float, num_examples: int, generator: torch.Generator,
                batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """Gradient-sign estimate on public records and truncated SVD (see module docstring)."""
    n = min(num_examples, len(public))
    if n == 0:
        from dpfed.errors import DataError

        raise DataError("init 'public' needs public records, got 0 (raise data.public_fraction or use init: random)")
    sel = torch.randperm(len(public), generator=generator)[:n].tolist()
    info: dict[str, float] = {"public_examples": float(n)}
    # zero the adapters so the estimate is taken at W0, and make the adapted base weights trainable
    zero_factors(adapters)
    weights = {name: layer.base.weight for name, layer in adapters.items()}
    saved = {name: w.requires_grad for name, w in weights.items()}
    head_flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for start in range(0, n, batch_size):
            batch = public.batch(sel[start:start + batch_size], device)
            per_example_loss(model, batch, task=task).sum().backward()
        factors_from_gradient(adapters, {name: w.grad for name, w in weights.items()}, lr=lr, generator=generator)
    finally:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(saved[name])
        for p, flag in zip(model.parameters(), head_flags):
            p.requires_grad_(flag)
    return info
