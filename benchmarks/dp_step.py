"""One optimizer step of DP Fed-SB against non-private training and the Opacus baselines (issue 7).

Run ``python -m benchmarks.dp_step`` (``make bench``). The model is a randomly initialised Llama
built from a config (no weights are downloaded): Llama-3.2-1B shapes on CUDA, a tiny Llama on CPU.
In one process and on the same batches it times one full optimizer step (forward, backward,
per-sample clipping and noise where DP, optimizer step) of

  a. Fed-SB DP-SGD as dpfed does it: ``per_sample_gradients`` → ``clipped_sum`` → ``noised_mean``
     → ``apply_gradients`` → SGD step (per-sample gradients of R from one batched backward);
  b. Fed-SB without DP (same model, the mean loss backward);
  c. PEFT LoRA r=16 on q,k,v,o,gate,up,down, without DP;
  d. the same PEFT LoRA under Opacus DP-SGD, hooks mode (``PrivacyEngine.make_private``);
  e. the Fed-SB paper's own DP path: R as an ``nn.Linear(r, r, bias=False)`` between frozen
     ``A`` and ``B`` linears, under Opacus ghost clipping (``grad_sample_mode="ghost"``).

All steps use the same causal-LM loss (mean next-token cross-entropy per sequence) and SGD.
The methods' steps are interleaved (round robin, one step each in turn) after a warm-up, and
the median over the timed steps is reported.
CUDA: CUDA events (a synchronize after each step, none inside), peak memory of one step from
``torch.cuda.max_memory_allocated`` (reset before it, measured above what was resident), the
number of synchronising CUDA calls in one step, bf16 autocast over a bf16 frozen base with the
adapters in fp32. CPU: ``time.perf_counter``, fp32, no autocast, tiny shapes.
"Adapter MiB" is what each configuration keeps resident beyond the frozen base (adapter
parameters and buffers).
Every configuration also reports the bytes autograd saved for backward in one step (activations,
excluding parameters and buffers); Opacus keeps its hook activations outside autograd, so for
d and e that column undercounts.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import chain

import torch
from torch import nn

from dpfed.adapters.init import init_random
from dpfed.adapters.lorasb import LoRASBLinear
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.model import DEFAULT_TARGETS, build_from_config, select_targets
from dpfed.privacy import (
    DPSGDParams,
    apply_gradients,
    clipped_sum,
    make_generator,
    noised_mean,
    per_example_loss,
    per_sample_gradients,
)

TARGETS = DEFAULT_TARGETS["llama"]
TASK = "causal-lm"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rank: int  # default Fed-SB rank for this model


MODELS = {
    # Llama-3.2-1B: hidden 2048, MLP 8192, 16 layers, 32 heads (8 kv), vocab 128256, tied embeddings
    "llama-3.2-1b": ModelSpec("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, rank=96),
    "tiny-llama": ModelSpec("tiny-llama", 256, 688, 4, 4, 2, 2000, rank=32),
    "micro-llama": ModelSpec("micro-llama", 64, 128, 2, 4, 2, 128, rank=8),  # smoke tests
}

METHODS = {
    "a": "Fed-SB DP (dpfed)",
    "b": "Fed-SB non-private",
    "c": "PEFT LoRA non-private",
    "d": "PEFT LoRA + Opacus hooks",
    "e": "R as Linear + Opacus ghost",
}


@dataclass
class Settings:
    device: torch.device
    model: ModelSpec
    shapes: list[tuple[int, int]]
    rank: int
    lora_rank: int
    warmup: int
    steps: int
    autocast: torch.dtype | None
    base_dtype: torch.dtype
    methods: list[str]
    seed: int = 0
    clip: float = 1.0
    noise_multiplier: float = 1.0
    lr: float = 1e-3
    strict: bool = False


@dataclass
class Result:
    shape: str
    method: str
    label: str
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    peak_bytes: int | None = None  # CUDA only: peak allocated during one step above what was resident before it
    host_syncs: int | None = None  # CUDA only: synchronising calls in one step (sync debug mode)
    adapter_bytes: int | None = None  # resident parameters and buffers beyond the frozen base model
    saved_bytes: int | None = None  # bytes autograd saved for backward in one step
    phases_ms: dict[str, float] | None = None  # method a only: median per phase
    error: str | None = None


# -- timing --------------------------------------------------------------------------------


class Clock:
    """Step and phase timestamps: CUDA events on CUDA (no host sync inside a step), else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.records: list[list[tuple[str, object]]] = []

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self.records.append([("start", self._now())])

    def mark(self, name: str) -> None:
        if self.records:
            self.records[-1].append((name, self._now()))

    def stop(self) -> None:
        self.mark("other")

    def _ms(self, a: object, b: object) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[union-attr, operator]

    def results(self) -> tuple[list[float], dict[str, float]]:
        """Per-step totals (ms) and the median of each phase (ms) over the recorded steps."""
        if self.cuda:
            torch.cuda.synchronize()
        totals, phases = [], {}
        for rec in self.records:
            totals.append(self._ms(rec[0][1], rec[-1][1]))
            for (_, t0), (name, t1) in zip(rec, rec[1:]):
                phases.setdefault(name, []).append(self._ms(t0, t1))
        return totals, {k: statistics.median(v) for k, v in phases.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(run: Callable[[], None], modules: list[nn.Module]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run`` runs.

    Parameters and buffers of ``modules`` are excluded (they are resident anyway).
    """
    resident = {t.untyped_storage().data_ptr() for m in modules for t in chain(m.parameters(), m.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = s.data_ptr()
        if ptr and ptr not in resident:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


# -- models --------------------------------------------------------------------------------


def build_template(spec: ModelSpec, *, max_len: int, device: torch.device, dtype: torch.dtype,
                   seed: int) -> nn.Module:
    """A frozen, randomly initialised Llama causal LM of ``spec``'s shapes on ``device``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads, max_position_embeddings=max(max_len, 128),
        tie_word_embeddings=True, rope_theta=500000.0, attention_dropout=0.0,
    )
    # transformers initialises weights from torch's global RNG; seeding it here (a benchmark, not
    # library code) makes the random model reproducible. PEFT's lora_A init below draws from it too.
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_from_config(cfg, task=TASK)
    return model.to(dtype)


def fedsb_model(template: nn.Module, *, rank: int, seed: int,
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[nn.Module, dict[str, LoRASBLinear]]:
    """A Fed-SB copy of ``template``: orthonormal B, A from ``init_random``, R = 0.

    ``factors`` caches name → (B, A) across calls: the seeded QRs on the CPU take seconds at 1B
    shapes and every Fed-SB configuration gets the same factors anyway.
    """
    model = copy.deepcopy(template)
    adapters = inject_lorasb(model, select_targets(model, TARGETS), rank=rank)
    if not factors:
        init_random(adapters, generator=torch.Generator().manual_seed(seed))
        factors.update({n: (layer.B.clone(), layer.A.clone()) for n, layer in adapters.items()})
    else:
        for n, layer in adapters.items():
            B, A = factors[n]
            layer.set_factors(B=B, A=A, R=torch.zeros(rank, rank))
    return model, adapters


def peft_lora_model(template: nn.Module, *, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(template), cfg)


class LatentLoRALinear(nn.Module):
    """The Fed-SB reference layer: ``base(x) + lora_B(lora_R(lora_A(x)))`` with only ``lora_R`` trained.

    ``lora_A`` (d_in→r) and ``lora_B`` (r→d_out) are frozen ``nn.Linear``s and ``lora_R`` an
    ``nn.Linear(r, r, bias=False)``, so Opacus sees one supported trainable layer per adapter.
    Built from a :class:`LoRASBLinear` with the same factors (the same function).
    """

    def __init__(self, layer: LoRASBLinear) -> None:
        super().__init__()
        r, dev = layer.rank, layer.A.device
        self.base = layer.base
        self.lora_A = nn.Linear(layer.in_features, r, bias=False, device=dev)
        self.lora_R = nn.Linear(r, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, layer.out_features, bias=False, device=dev)
        self.scale = layer.scale
        with torch.no_grad():
            self.lora_A.weight.copy_(layer.A)
            self.lora_R.weight.copy_(layer.R)
            self.lora_B.weight.copy_(layer.B)
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.lora_B(self.lora_R(self.lora_A(x.to(self.lora_A.weight.dtype)))) * self.scale
        return y + delta.to(y.dtype)


def latent_lora_model(template: nn.Module, *, rank: int, seed: int, factors: dict) -> nn.Module:
    model, adapters = fedsb_model(template, rank=rank, seed=seed, factors=factors)
    for name, layer in adapters.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LatentLoRALinear(layer))
    return model


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                 *, mode: str, s: Settings, generator: torch.Generator):
    """``PrivacyEngine.make_private`` with the usual settings (flat clipping, mean loss, PRV accountant).

    ``poisson_sampling=False``: every configuration runs on the same fixed batches; Poisson
    sampling changes which rows a batch holds, not what a step costs.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.cat([b["input_ids"] for b in batches]).cpu()
    loader = DataLoader(TensorDataset(ids), batch_size=batches[0]["input_ids"].shape[0])
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=s.noise_multiplier,
                  max_grad_norm=s.clip, poisson_sampling=False, noise_generator=generator, grad_sample_mode=mode)
    engine = PrivacyEngine()
    if mode == "ghost":
        gsm, opt, criterion, _ = engine.make_private(criterion=nn.CrossEntropyLoss(), **kwargs)
        return gsm, opt, criterion
    gsm, opt, _ = engine.make_private(**kwargs)
    return gsm, opt, None


# -- steps ---------------------------------------------------------------------------------


def _autocast(s: Settings):
    return torch.autocast(s.device.type, dtype=s.autocast, enabled=s.autocast is not None)


def _mean_loss_step(model: nn.Module, opt: torch.optim.Optimizer, s: Settings):
    def step(batch: dict[str, torch.Tensor], clock: Clock | None = None) -> None:
        with _autocast(s):
            loss = per_example_loss(model, batch, task=TASK).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fedsb_dp_step(model: nn.Module, opt: torch.optim.Optimizer, s: Settings, bsz: int, generator: torch.Generator):
    params = DPSGDParams(noise_multiplier=s.noise_multiplier, clip=s.clip, expected_batch_size=bsz)

    def step(batch: dict[str, torch.Tensor], clock: Clock | None = None) -> None:
        mark = clock.mark if clock is not None else (lambda _name: None)
        grads, _ = per_sample_gradients(model, batch, task=TASK, autocast_dtype=s.autocast)
        mark("per-sample fwd+bwd")
        sums, _ = clipped_sum(grads, clip=s.clip)
        mark("clip+sum")
        noisy = noised_mean(sums, params=params, generator=generator)
        mark("noise")
        apply_gradients(model, noisy)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("apply+sgd")

    return step


def _ghost_step(gsm: nn.Module, opt: torch.optim.Optimizer, criterion, s: Settings):
    def step(batch: dict[str, torch.Tensor], clock: Clock | None = None) -> None:
        with _autocast(s):
            out = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1].float()  # (B, T-1, V), as per_example_loss does
        target = batch["input_ids"][:, 1:]
        # per-sequence mean over tokens (the batches carry no padding), then Opacus' two backward passes
        loss = criterion(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), shape=logits.shape)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def setup(method: str, template: nn.Module, batches: list[dict[str, torch.Tensor]], s: Settings,
          factors: dict | None = None):
    """Build method ``method``'s model and step; returns (step, the model the step trains)."""
    factors = {} if factors is None else factors
    bsz = batches[0]["input_ids"].shape[0]
    gen = make_generator(s.seed + 1, s.device)
    if method in ("a", "b"):
        model, _ = fedsb_model(template, rank=s.rank, seed=s.seed, factors=factors)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=s.lr)
        step = _fedsb_dp_step(model, opt, s, bsz, gen) if method == "a" else _mean_loss_step(model, opt, s)
        return step, model
    if method in ("c", "d"):
        model = peft_lora_model(template, rank=s.lora_rank)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=s.lr)
        if method == "c":
            return _mean_loss_step(model, opt, s), model
        model.train()  # Opacus captures activations only in training mode (no dropout: lora_dropout=0, attention 0)
        gsm, dp_opt, _ = make_private(model, opt, batches, mode="hooks", s=s, generator=gen)
        return _mean_loss_step(gsm, dp_opt, s), gsm
    if method == "e":
        model = latent_lora_model(template, rank=s.rank, seed=s.seed, factors=factors)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=s.lr)
        model.train()
        gsm, dp_opt, criterion = make_private(model, opt, batches, mode="ghost", s=s, generator=gen)
        return _ghost_step(gsm, dp_opt, criterion, s), gsm
    raise ValueError(f"method must be one of {sorted(METHODS)}, got '{method}'")


def make_batches(bsz: int, seq: int, *, vocab: int, count: int, device: torch.device, seed: int):
    """``count`` fixed batches of random token ids (no padding), from an explicit generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return out


def _fail(res: Result, exc: BaseException, s: Settings) -> None:
    if s.strict:
        raise exc
    res.error = f"{type(exc).__name__}: {exc}"
    traceback.print_exc(file=sys.stderr)


def _count_syncs(run: Callable[[], None]) -> int:
    """Synchronising CUDA calls made by ``run`` (``torch.cuda.set_sync_debug_mode('warn')``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))


def run_shape(template: nn.Module, batches: list[dict[str, torch.Tensor]], shape: str, s: Settings,
              factors: dict | None = None) -> list[Result]:
    """Time every method on ``batches``, interleaved step by step (round robin).

    Round robin spreads slow drift and other processes' load on a shared machine evenly over the
    methods. Memory is measured afterwards, one step per method with the peak counter reset.
    """
    dev = s.device
    results = {m: Result(shape=shape, method=m, label=METHODS[m]) for m in s.methods}
    steps: dict[str, Callable] = {}
    models: dict[str, nn.Module] = {}
    for m in s.methods:
        try:
            steps[m], models[m] = setup(m, template, batches, s, factors)
            for i in range(s.warmup):
                steps[m](batches[i % len(batches)])
            _sync(dev)
        except Exception as exc:  # one failing baseline must not hide the others
            _fail(results[m], exc, s)
            steps.pop(m, None)
            models.pop(m, None)
    clocks = {m: Clock(dev) for m in steps}
    for i in range(s.steps):
        for m in list(steps):
            try:
                clocks[m].start()
                steps[m](batches[i % len(batches)], clocks[m])
                clocks[m].stop()
                _sync(dev)  # no overlap between methods' steps
            except Exception as exc:
                _fail(results[m], exc, s)
                del steps[m], models[m]
    for m, step in steps.items():
        res = results[m]
        try:
            res.times_ms, phases = clocks[m].results()
            res.median_ms = statistics.median(res.times_ms)
            if m == "a":
                res.phases_ms = phases
            if dev.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                mem0 = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(batches[0])
                torch.cuda.synchronize()
                res.peak_bytes = torch.cuda.max_memory_allocated() - mem0
                res.host_syncs = _count_syncs(lambda: step(batches[0]))
            res.saved_bytes = saved_bytes(lambda: step(batches[0]), [models[m], template])
            res.adapter_bytes = _state_bytes(models[m]) - _state_bytes(template)
            _sync(dev)
        except Exception as exc:
            _fail(res, exc, s)
    del steps, models
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return [results[m] for m in s.methods]


# -- report --------------------------------------------------------------------------------


def _ratio(x: float | int | None, y: float | int | None) -> float | None:
    return None if x is None or y is None or y == 0 else x / y


def ratios(results: list[Result]) -> dict[str, dict[str, float | None]]:
    out = {}
    for shape in dict.fromkeys(r.shape for r in results):
        by = {r.method: r for r in results if r.shape == shape}

        def get(m: str, attr: str):
            return getattr(by[m], attr) if m in by else None

        out[shape] = {
            "time_a_over_b": _ratio(get("a", "median_ms"), get("b", "median_ms")),
            "time_a_over_c": _ratio(get("a", "median_ms"), get("c", "median_ms")),
            "time_a_over_d": _ratio(get("a", "median_ms"), get("d", "median_ms")),
            "time_a_over_e": _ratio(get("a", "median_ms"), get("e", "median_ms")),
            "peak_mem_a_over_b": _ratio(get("a", "peak_bytes"), get("b", "peak_bytes")),
            "saved_a_over_b": _ratio(get("a", "saved_bytes"), get("b", "saved_bytes")),
        }
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def format_table(results: list[Result], rats: dict, meta: dict) -> str:
    lines = [
        f"device: {meta['device']} | model: {meta['model']} (random init) | Fed-SB r={meta['rank']} | "
        f"LoRA r={meta['lora_rank']} | autocast: {meta['autocast']} | warm-up {meta['warmup']}, "
        f"timed steps {meta['steps']}",
        f"{'shape':<8} {'method':<30} {'median ms':>10} {'min-max ms':>17} {'step peak MiB':>14} "
        f"{'saved MiB':>10} {'adapter MiB':>12} {'syncs':>6}",
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.shape:<8} {r.method} {r.label:<28} FAILED: {r.error[:80]}")
            continue
        spread = f"{min(r.times_ms):.1f}-{max(r.times_ms):.1f}"
        lines.append(f"{r.shape:<8} {r.method} {r.label:<28} {_fmt(r.median_ms):>10} {spread:>17} "
                     f"{_mib(r.peak_bytes):>14} {_mib(r.saved_bytes):>10} {_mib(r.adapter_bytes):>12} "
                     f"{'-' if r.host_syncs is None else r.host_syncs:>6}")
    for shape, q in rats.items():
        lines.append(f"{shape}: time a/b {_fmt(q['time_a_over_b'], '.2f')}, a/c {_fmt(q['time_a_over_c'], '.2f')}, "
                     f"a/d {_fmt(q['time_a_over_d'], '.2f')}, a/e {_fmt(q['time_a_over_e'], '.2f')}; "
                     f"peak memory a/b {_fmt(q['peak_mem_a_over_b'], '.2f')}; "
                     f"saved-for-backward a/b {_fmt(q['saved_a_over_b'], '.2f')}")
    for r in results:
        if r.phases_ms:
            ph = ", ".join(f"{k} {v:.2f}" for k, v in r.phases_ms.items())
            lines.append(f"{r.shape} phases of a (median ms): {ph}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            b, t = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes must be BxT[,BxT...] (e.g. 16x256,64x128), got '{text}'") from None
        if b < 1 or t < 2:
            raise SystemExit(f"--shapes needs batch >= 1 and length >= 2, got '{part}'")
        shapes.append((b, t))
    return shapes


def build_settings(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", choices=sorted(MODELS), help="default: llama-3.2-1b on CUDA, tiny-llama on CPU")
    p.add_argument("--shapes", help="batch x length list; default 16x256,64x128 on CUDA, 8x64,16x32 on CPU")
    p.add_argument("--steps", type=int, help="timed steps; default 20 on CUDA, 5 on CPU (--quick: 5, 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first; default 5 on CUDA, 1 on CPU (--quick: 2, 1)")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not for reporting)")
    p.add_argument("--rank", type=int, help="Fed-SB rank for a, b, e; default 96 (1B), 32 (tiny)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--methods", default="a,b,c,d,e", help="subset of a,b,c,d,e")
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                   help="bf16 autocast over a bf16 base (default on CUDA) or fp32 (default on CPU)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="stop at the first failing configuration")
    a = p.parse_args(argv)

    if a.threads is not None:
        if a.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(a.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    cuda = dev.type == "cuda"
    spec = MODELS[a.model or ("llama-3.2-1b" if cuda else "tiny-llama")]
    steps = a.steps if a.steps is not None else (5 if cuda else 2) if a.quick else (20 if cuda else 5)
    warmup = a.warmup if a.warmup is not None else (2 if cuda else 1) if a.quick else (5 if cuda else 1)
    if steps < 1 or warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods must be a subset of {','.join(METHODS)}, got {bad}")
    use_bf16 = a.autocast == "bf16" or (a.autocast == "auto" and cuda)
    s = Settings(
        device=dev, model=spec,
        shapes=parse_shapes(a.shapes or ("16x256,64x128" if cuda else "8x64,16x32")),
        rank=a.rank or spec.rank, lora_rank=a.lora_rank, warmup=warmup, steps=steps,
        autocast=torch.bfloat16 if use_bf16 else None,
        base_dtype=torch.bfloat16 if use_bf16 else torch.float32,
        methods=methods, seed=a.seed, strict=a.strict,
    )
    return s, a


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> dict:
    s, a = build_settings(argv)
    import opacus
    import peft
    import transformers

    warnings.filterwarnings("ignore", module=r"opacus(\.|$)")
    warnings.filterwarnings("ignore", message=r".*[Ss]ecure RNG.*")
    warnings.filterwarnings("ignore", message=r"Full backward hook is firing")  # Opacus hooks, frozen inputs
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")  # peft + transformers 5
    meta = {
        "device": device_name(s.device),
        "model": s.model.name, "model_spec": asdict(s.model), "rank": s.rank, "lora_rank": s.lora_rank,
        "autocast": "bf16" if s.autocast is not None else "none", "base_dtype": str(s.base_dtype),
        "warmup": s.warmup, "steps": s.steps, "clip": s.clip, "noise_multiplier": s.noise_multiplier,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "opacus": opacus.__version__, "python": platform.python_version(),
        "command": "python -m benchmarks.dp_step " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "methods": {m: METHODS[m] for m in s.methods},
    }
    max_len = max(t for _, t in s.shapes)
    template = build_template(s.model, max_len=max_len, device=s.device, dtype=s.base_dtype, seed=s.seed)
    results: list[Result] = []
    factors: dict = {}  # Fed-SB B, A shared by a, b, e and across shapes
    for bsz, seq in s.shapes:
        shape = f"{bsz}x{seq}"
        batches = make_batches(bsz, seq, vocab=s.model.vocab, count=4, device=s.device, seed=s.seed + 7)
        for r in run_shape(template, batches, shape, s, factors):
            results.append(r)
            done = "FAILED" if r.error else f"{r.median_ms:.1f} ms"
            print(f"  {shape} {r.method}: {done}", file=sys.stderr, flush=True)
    rats = ratios(results)
    print(format_table(results, rats, meta))
    report = {"meta": meta, "results": [asdict(r) for r in results], "ratios": rats}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(r["error"] for r in report["results"]) else 0)
