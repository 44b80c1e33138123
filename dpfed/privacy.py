"""DP-SGD on the trainable adapter: Poisson sampling, per-sample gradients, clipping, seeded noise.

DP-SGD (Abadi et al. 2016, arXiv 1607.00133, Algorithm 1) with Poisson sampling at rate
q = b / n (each record independently), per-example clipping to C and Gaussian noise
N(0, σ²C²) on the sum, divided by the *expected* batch size b (so the empty batch is
handled and the sensitivity stays C / b).

Noise comes from an explicit ``torch.Generator`` (seeded from OS entropy unless the user fixes
a seed); no global RNG is used.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from accounting.sampling import exact_rate, sample_rate  # noqa: F401  (re-exported: the rates poisson_sample draws)
from dpfed.errors import ConfigError, PrivacyCheckError
from dpfed.instruct import response_loss
from dpfed.persample import per_sample_mode, per_sample_weight_mode


@dataclass(frozen=True)
class DPSGDParams:
    """Parameters of one client's DP-SGD; keyword-only to avoid σ / C / q mix-ups."""

    noise_multiplier: float
    clip: float
    expected_batch_size: float

    def __init__(self, *, noise_multiplier: float, clip: float, expected_batch_size: float) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"clip must be a finite number > 0, got {clip!r}")
        if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
            raise ConfigError(f"batch_size must be > 0, got {expected_batch_size!r}")
        object.__setattr__(self, "noise_multiplier", float(noise_multiplier))
        object.__setattr__(self, "clip", float(clip))
        object.__setattr__(self, "expected_batch_size", float(expected_batch_size))


@dataclass(frozen=True)
class FixedGradientRecords:
    """Records whose per-sample gradient is fixed in advance: the white-box audit's Dirac canaries.

    Record ``j`` has gradient ``values[j]`` at flat coordinate ``indices[j]`` of trainable parameter
    ``names[j]`` and 0 everywhere else, whatever the model (the gradient-insertion adversary of Nasr
    et al., arXiv 2101.04535, Sec. 4, used for auditing by Nasr et al., arXiv 2302.07956, and
    Steinke, Nasr & Jagielski, arXiv 2305.08846, Sec. 6). A client holding such records counts them
    in its population n (so q = b / n and delta < 1/n count them), Poisson-samples them with its
    real records, and clips and noises their gradients in the same sum: DP-SGD's guarantee covers
    any record, including one whose gradient an adversary chose.
    """

    names: tuple[str, ...]
    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        k = len(self.names)
        if len(self.indices) != k or len(self.values) != k:
            raise ConfigError(f"fixed-gradient records need one name, index and value each; got "
                              f"{k} names, {len(self.indices)} indices, {len(self.values)} values")
        if any(int(i) < 0 for i in self.indices):
            raise ConfigError("fixed-gradient record indices must be >= 0")
        if not all(math.isfinite(v) for v in self.values):
            raise ConfigError("fixed-gradient record values must be finite")

    def __len__(self) -> int:
        return len(self.names)

    def _entry(self, j: int, shapes: dict[str, torch.Size]) -> tuple[str, int]:
        name = self.names[j]
        if name not in shapes:
            raise PrivacyCheckError(f"fixed-gradient record {j} names {name!r}, which is not a trainable parameter")
        if self.indices[j] >= math.prod(shapes[name]):
            raise PrivacyCheckError(f"fixed-gradient record {j}: index {self.indices[j]} is outside {name!r} "
                                    f"({math.prod(shapes[name])} entries)")
        return name, self.indices[j]

    def per_sample(self, rows, shapes: dict[str, torch.Size], *, device: torch.device | str = "cpu"
                   ) -> dict[str, torch.Tensor]:
        """Name → (len(rows), *shape) per-sample gradients of records ``rows`` (zeros but one entry each)."""
        rows = [int(r) for r in rows]
        out = {n: torch.zeros((len(rows), *shape), device=device, dtype=torch.float32) for n, shape in shapes.items()}
        for b, j in enumerate(rows):
            name, i = self._entry(j, shapes)
            out[name][b].view(-1)[i] = self.values[j]
        return out

    def summed(self, rows, shapes: dict[str, torch.Size], *, clip: float | None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Name → the sum over ``rows`` of their gradients, each clipped to ``clip`` first (None: not clipped).

        Equals :func:`clipped_sum` of :meth:`per_sample` (a record's norm is ``|value|``) without
        the (rows, *shape) tensors: one entry per record is written, so the step's memory does not
        grow with the number of sampled canaries times the trainable size.
        """
        out = {n: torch.zeros(shape, device=device, dtype=torch.float32) for n, shape in shapes.items()}
        for j in (int(r) for r in rows):
            name, i = self._entry(j, shapes)
            v = torch.tensor(self.values[j], dtype=torch.float32)
            if clip is not None:
                v = v * clip_factors(v.abs(), clip=clip)
            out[name].view(-1)[i] += v.to(out[name].device)
        return out


def new_seed() -> int:
    """A 63-bit seed from the OS entropy pool."""
    return secrets.randbits(63)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def poisson_sample(n: int, q: float, *, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` records independently with probability ``q``.

    Draws float64 uniforms on the CPU generator (k / 2**53, see :mod:`accounting.sampling`): a float32
    draw would include a record with probability up to 6e-8 above the recorded q.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"the sampling generator must be a CPU generator, got one on {generator.device}")
    mask = torch.rand(n, generator=generator, dtype=torch.float64) < q
    return torch.nonzero(mask, as_tuple=False).flatten()


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, task: str) -> torch.Tensor:
    """One loss per example, shape (B,).

    Causal LM: mean next-token loss over the example's tokens. Instruct: mean next-token loss over
    the response tokens only (``batch["labels"]`` is -100 at prompt and padding positions), the LM
    head evaluated at those positions only (:func:`dpfed.instruct.response_loss`).
    """
    if task == "classification":
        logits = model(batch["input_ids"], batch["attention_mask"], hidden=batch.get("hidden"))  # (B, K)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    if task == "instruct":
        return response_loss(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    target = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].float()
    tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def per_sample_gradients(model: nn.Module, batch: dict[str, torch.Tensor], *, task: str,
                         autocast_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Name → (B, *param_shape) gradients of each example's loss, and the per-example losses.

    Checks that every trainable parameter received a per-sample gradient (opacus issue 820).
    """
    bsz = batch["input_ids"].shape[0]
    with per_sample_mode(model, bsz) as leaves:
        dev_type = batch["input_ids"].device.type
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = per_example_loss(model, batch, task=task)
        losses.sum().backward()
        missing = [n for n, leaf in leaves.items() if leaf.grad is None]
        if missing:
            raise PrivacyCheckError(f"no per-sample gradient reached trainable parameters {missing[:5]}")
        grads = {n: leaf.grad for n, leaf in leaves.items()}
    return grads, losses.detach()


def per_sample_weight_gradients(model: nn.Module, adapters: dict, batch: dict[str, torch.Tensor], *, task: str,
                                autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Layer name → (B, d_out, d_in) gradients of each example's loss with respect to the adapted base weights.

    Used by the DP initialisation; no parameter's ``.grad`` is touched.
    """
    bsz = batch["input_ids"].shape[0]
    with per_sample_weight_mode(adapters, bsz) as leaves:
        dev_type = batch["input_ids"].device.type
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = per_example_loss(model, batch, task=task)
        names = list(leaves)
        grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in names], allow_unused=True)
    missing = [n for n, g in zip(names, grads) if g is None]
    if missing:
        raise PrivacyCheckError(f"no per-sample gradient reached the adapted weights {missing[:5]}")
    return dict(zip(names, grads))


def clipped_sum(per_sample: dict[str, torch.Tensor], *, clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's joint gradient (over all parameters) to norm ``clip`` and sum over examples.

    Returns name → summed clipped gradient and the (B,) per-example norms before clipping.
    """
    names = list(per_sample)
    sq = torch.stack([per_sample[n].reshape(per_sample[n].shape[0], -1).float().pow(2).sum(1) for n in names], 0).sum(0)
    norms = sq.sqrt()  # (B,)
    factor = clip_factors(norms, clip=clip)  # (B,)
    return {n: torch.einsum("b,b...->...", factor, per_sample[n].float()) for n in names}, norms


def clip_factors(norms: torch.Tensor, *, clip: float) -> torch.Tensor:
    """min(1, C / ‖g‖): the factor that scales a gradient of norm ``‖g‖`` to norm at most C."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def noised_mean(sums: dict[str, torch.Tensor], *, params: DPSGDParams,
                generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Add N(0, σ²C²) to each summed coordinate and divide by the expected batch size b.

    ``generator`` may be None only when σ = 0 (comparison runs that claim no guarantee).
    """
    out = {}
    for n, s in sums.items():
        if params.noise_multiplier > 0:
            if generator is None:
                raise PrivacyCheckError("a noise generator is required when noise_multiplier > 0")
            noise = torch.randn(s.shape, generator=generator, device=generator.device, dtype=s.dtype)
            s = s + noise.to(s.device) * (params.noise_multiplier * params.clip)
        out[n] = s / params.expected_batch_size
    return out


def zero_sums(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero gradient sums, one per trainable parameter (start of a step; an empty batch stays zero)."""
    return {n: torch.zeros(p.shape, device=p.device, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def apply_gradients(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Set ``p.grad`` of every trainable parameter from ``grads`` (names must match exactly)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(grads):
        raise PrivacyCheckError(
            f"gradient names must match the trainable parameters: missing {sorted(set(params) - set(grads))[:3]}, "
            f"unexpected {sorted(set(grads) - set(params))[:3]}"
        )
    for n, p in params.items():
        p.grad = grads[n].to(p.dtype).reshape(p.shape)
