"""The in-process round loop: config → data → model+adapter → clients → aggregation → ledger → report.

:func:`prepare` validates everything and builds the job without writing a byte; :func:`run`
creates the run directory and trains. Library code never prints: progress goes to a callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dpfed import config as config_mod
from dpfed.adapters.init import fit_head_public, init_head_random, init_public, init_random
from dpfed.adapters.lorasb import LoRASBLinear, load_trainable_state, trainable_state
from dpfed.aggregation import FedSBAggregator
from dpfed.client import Budget, Client, LocalTraining
from dpfed.config import RunConfig
from dpfed.data import Splits, TokenizedShard, attach_prefix_cache, load_records, load_tokenizer, split_and_partition, tokenize
from dpfed.errors import ConfigError, DataError
from dpfed.model import DEFAULT_TARGETS, SequenceClassifier, _layer_index, load_base, model_family, inject_lorasb, resolve_model_path, select_targets
from dpfed.payload import FRAMING_BYTES, KIND_DOWN, KIND_UP, Manifest, encode
from dpfed.privacy import DPSGDParams, make_generator, new_seed, per_example_loss

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


def _noop(kind: str, info: dict[str, Any]) -> None:
    return None


@dataclass
class Job:
    cfg: RunConfig
    model: nn.Module
    adapters: dict[str, LoRASBLinear]
    tokenizer: Any
    splits: Splits
    test: TokenizedShard
    shards: list[TokenizedShard]
    device: torch.device
    autocast_dtype: torch.dtype | None
    seed: int
    seed_is_user: bool
    noise_multiplier: float | None
    init_info: dict[str, float] = field(default_factory=dict)
    setup_seconds: float = 0.0

    @property
    def dp(self) -> bool:
        return self.cfg.privacy.enabled


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device must be available on this machine, got '{name}' (no CUDA device found)")
    return dev


def _child_seed(seed: int, *path: int) -> int:
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


def prepare(cfg: RunConfig, *, progress: Progress = _noop) -> Job:
    """Validate the whole configuration against data and model and build the job. Writes nothing."""
    t0 = time.time()
    seed_is_user = cfg.seed is not None
    seed = cfg.seed if seed_is_user else new_seed()
    device = resolve_device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    task = cfg.model.task
    progress("setup", {"stage": "data"})
    records = load_records(cfg.data, task=task)
    splits = split_and_partition(records, cfg.data, seed=_child_seed(seed, 1))
    progress("setup", {"stage": "model"})
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path)
    num_labels = len(records.label_names) if records.labels is not None else 0
    model = load_base(cfg.model.name, task=task, num_labels=max(num_labels, 2))
    model_type = getattr(model.config, "model_type", "")
    targets = cfg.model.target_modules or DEFAULT_TARGETS[model_family(model_type)]
    names = select_targets(model, tuple(targets), cfg.model.adapt_layers)
    adapters = inject_lorasb(model, names, rank=cfg.model.rank)
    model.to(device)
    ml = cfg.model.max_length
    shards = [tokenize(c, tokenizer, max_length=ml) for c in splits.clients]
    test = tokenize(splits.test, tokenizer, max_length=ml)
    n_min = min(len(s) for s in shards)
    if cfg.train.batch_size > n_min:
        raise ConfigError(f"batch_size must be <= the smallest client shard ({n_min} records), got {cfg.train.batch_size}")
    sigma = None
    if cfg.privacy.enabled:
        if cfg.privacy.delta >= 1.0 / n_min:
            raise ConfigError(f"delta must be < 1/n_min = {1.0 / n_min:.3g} (smallest client holds {n_min} records), got {cfg.privacy.delta:g}")
        sigma = cfg.privacy.noise_multiplier or calibrate(cfg, [len(s) for s in shards])
    progress("setup", {"stage": "init", "strategy": cfg.init.strategy})
    gen = make_generator(_child_seed(seed, 2))
    init_info: dict[str, float] = {}
    init_head_random(model, generator=gen)
    needs_public = cfg.init.strategy == "public" or (cfg.init.head == "public" and isinstance(model, SequenceClassifier))
    public = tokenize(splits.public, tokenizer, max_length=ml) if needs_public else None
    if public is not None and len(public) == 0:
        raise DataError("init needs public records, got 0 (raise data.public_fraction, or use init strategy/head 'random')")
    if cfg.init.head == "public" and isinstance(model, SequenceClassifier):
        init_info.update(fit_head_public(model, public, examples=cfg.init.public_examples, epochs=cfg.init.head_epochs,
                                         generator=gen, device=device))
    if cfg.init.strategy == "random":
        init_random(adapters, generator=gen)
    else:
        init_info.update(init_public(model, adapters, public, task=task, lr=cfg.init.lr,
                                     num_examples=cfg.init.public_examples, generator=gen, device=device))
    if cfg.model.prefix_cache and isinstance(model, SequenceClassifier):
        progress("setup", {"stage": "prefix cache"})
        init_info.update(_enable_prefix_cache(model, names, shards + [test], device))
    return Job(cfg, model, adapters, tokenizer, splits, test, shards, device, autocast_dtype, seed, seed_is_user,
               sigma, init_info, time.time() - t0)


def _enable_prefix_cache(model: SequenceClassifier, names: list[str], shards: list[TokenizedShard],
                         device: torch.device) -> dict[str, float]:
    """Cache hidden states below the lowest adapted layer when the split forward is exact."""
    start = min((_layer_index(n) for n in names if _layer_index(n) is not None), default=0)
    if start == 0 or getattr(model.config, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "electra"):
        return {"prefix_cache_layers": 0.0}
    model.prefix_start = start
    probe = shards[-1].batch(range(min(8, len(shards[-1]))), device)
    if not model.prefix_matches(probe["input_ids"], probe["attention_mask"]):
        log.warning("frozen-prefix cache disabled: the split forward does not match the full forward")
        model.prefix_start = 0
        return {"prefix_cache_layers": 0.0}
    for shard in shards:
        attach_prefix_cache(model, shard, device=device)
    return {"prefix_cache_layers": float(start)}


def calibrate(cfg: RunConfig, sizes: list[int]) -> float:
    """σ such that the client with the most compositions ends at or below ε after all planned rounds."""
    from accounting.planning import calibrate_noise

    steps = cfg.train.rounds * cfg.train.local_steps
    workloads = [(min(1.0, cfg.train.batch_size / n), steps) for n in sizes]
    return calibrate_noise(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, workloads=workloads)


def evaluate(model: nn.Module, data: TokenizedShard, *, task: str, device: torch.device,
             batch_size: int, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """Accuracy and mean loss (classification) or mean token loss (causal LM) on ``data``."""
    correct, losses, n = 0, [], len(data)
    order = sorted(range(n), key=lambda i: len(data.ids[i]))  # length-sorted: little padding
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, n, batch_size):
            batch = data.batch(order[start:start + batch_size], device)
            if task == "classification":
                logits = model(batch["input_ids"], batch["attention_mask"], hidden=batch.get("hidden")).float()  # (B, K)
                losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").cpu())
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                losses.append(per_example_loss(model, batch, task=task).float().cpu())
    out = {"eval_loss": float(torch.cat(losses).mean())}
    if task == "classification":
        out["accuracy"] = correct / n
    return out


def _json_dump(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def run(job: Job, run_dir: Path, *, progress: Progress = _noop) -> dict[str, Any]:
    """Train for the configured rounds; write the run directory; return the summary."""
    from accounting.ledger import Ledger
    from accounting.prv import epsilon as prv_epsilon

    cfg, model, device = job.cfg, job.model, job.device
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    budget = Budget(cfg.privacy.epsilon, cfg.privacy.delta) if job.dp else None
    if job.dp:
        _json_dump(run_dir / "budget.json", {"epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta,
                                             "accountant": "prv", "privacy_unit": "record"})
    ledger = Ledger(run_dir / "ledger.jsonl")
    training = LocalTraining(local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                             optimizer=cfg.train.optimizer, momentum=cfg.train.momentum, task=cfg.model.task)
    clients = []
    for i, shard in enumerate(job.shards):
        dp = (DPSGDParams(noise_multiplier=job.noise_multiplier, clip=cfg.privacy.clip,
                          expected_batch_size=cfg.train.batch_size) if job.dp else None)
        clients.append(Client(client_id=f"client-{i:03d}", shard=shard, training=training, dp=dp,
                              sample_generator=make_generator(_child_seed(job.seed, 3, i)),
                              noise_generator=make_generator(_child_seed(job.seed, 4, i), device) if job.dp else None,
                              ledger=ledger, budget=budget, device=device, autocast_dtype=job.autocast_dtype))
    aggregator = FedSBAggregator(weighting=cfg.train.weighting)
    global_state = trainable_state(model)
    initial_state = {k: v.clone() for k, v in global_state.items()}
    manifest = Manifest.of(global_state)
    save_state(run_dir / "initial_state.safetensors", initial_state)
    select_gen = np.random.default_rng(_child_seed(job.seed, 5))
    per_round = max(1, int(math.ceil(cfg.train.client_fraction * len(clients))))
    eval0 = evaluate(model, job.test, task=cfg.model.task, device=device, batch_size=cfg.train.eval_batch_size,
                     autocast_dtype=job.autocast_dtype)
    progress("start", {"rounds": cfg.train.rounds, "clients_per_round": per_round, "local_steps": cfg.train.local_steps,
                       "eval": eval0, "noise_multiplier": job.noise_multiplier})
    bytes_up, bytes_down, rounds_done, stop_reason = [], [], 0, "completed"
    metrics_path = run_dir / "metrics.jsonl"
    last_eval = eval0
    for rnd in range(1, cfg.train.rounds + 1):
        chosen = sorted(select_gen.choice(len(clients), size=per_round, replace=False).tolist())
        try:
            for i in chosen:
                clients[i].check_budget()
        except Exception as exc:  # BudgetError: stop before anyone passes the budget
            stop_reason = str(exc)
            log.warning("stopping before round %d: %s", rnd, exc)
            break
        t_round = time.time()
        down = encode(global_state, manifest, round=rnd, kind=KIND_DOWN)
        results, ups = [], []
        for i in chosen:
            progress("client", {"round": rnd, "client": clients[i].client_id})
            res = clients[i].fit(model, global_state, round=rnd,
                                 on_step=lambda: progress("step", {"round": rnd}))
            msg = encode(res.state, manifest, round=rnd, kind=KIND_UP)
            ups.append(len(msg))
            bytes_down.append(len(down))
            results.append(res)
        global_state = aggregator.aggregate([r.state for r in results], [r.num_examples for r in results])
        bytes_up.extend(ups)
        load_trainable_state(model, global_state)
        ev = evaluate(model, job.test, task=cfg.model.task, device=device, batch_size=cfg.train.eval_batch_size,
                      autocast_dtype=job.autocast_dtype)
        last_eval = ev
        eps_clients = {c.client_id: prv_epsilon(ledger.events(c.client_id), delta=cfg.privacy.delta).upper
                       for c in clients} if job.dp else {}
        line = {"round": rnd, "clients": [clients[i].client_id for i in chosen],
                "train_loss": float(np.mean([r.mean_loss for r in results])), **ev,
                "epsilon_spent": max(eps_clients.values()) if eps_clients else None,
                "bytes_up": sum(ups), "bytes_down": len(down) * len(chosen), "seconds": time.time() - t_round}
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        rounds_done = rnd
        progress("round", line)
    from dpfed.adapters.export import export_adapters

    export_adapters(model, job.adapters, run_dir / "adapter", task=cfg.model.task, base_model=cfg.model.name)
    eps_clients = {c.client_id: prv_epsilon(ledger.events(c.client_id), delta=cfg.privacy.delta) for c in clients} if job.dp else {}
    trainable = sum(v.numel() for v in global_state.values())
    r2 = sum(a.rank ** 2 for a in job.adapters.values())
    summary = {
        "method": cfg.train.method,
        "privacy": "record-level DP per client (local DP-SGD)" if job.dp else "none (--no-dp): no privacy guarantee",
        "epsilon_target": cfg.privacy.epsilon if job.dp else None,
        "delta": cfg.privacy.delta if job.dp else None,
        "epsilon_spent": max(e.upper for e in eps_clients.values()) if eps_clients else None,
        "epsilon_per_client": {k: e.upper for k, e in eps_clients.items()},
        "accountant": "prv (upper bound)" if job.dp else None,
        "noise_multiplier": job.noise_multiplier,
        "clip": cfg.privacy.clip if job.dp else None,
        "sample_rates": {c.client_id: c.sample_rate for c in clients},
        "rounds_planned": cfg.train.rounds,
        "rounds_completed": rounds_done,
        "stop_reason": stop_reason,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "clients": len(clients),
        "clients_per_round": per_round,
        "client_sizes": {c.client_id: c.num_examples for c in clients},
        "init": cfg.init.strategy,
        "init_info": job.init_info,
        "initial_eval": eval0,
        "accuracy": last_eval.get("accuracy"),
        "eval_loss": last_eval["eval_loss"],
        "test_examples": len(job.test),
        "bytes_up_per_client_round": int(np.mean(bytes_up)) if bytes_up else 0,
        "bytes_down_per_client_round": int(np.mean(bytes_down)) if bytes_down else 0,
        "payload_values": trainable,
        "payload_formula": f"4*(sum r^2 = {r2} + head {trainable - r2}) + framing {FRAMING_BYTES}",
        "framing_bytes": FRAMING_BYTES,
        "trainable_params": trainable,
        "adapted_layers": len(job.adapters),
        "rank": cfg.model.rank,
        "wall_seconds": time.time() - t_start,
        "setup_seconds": job.setup_seconds,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "seed": job.seed if job.seed_is_user else "os-entropy (not recorded)",
        "data_fingerprints": {"test": job.splits.test.fingerprint(), "public": job.splits.public.fingerprint()},
    }
    _json_dump(run_dir / "summary.json", summary)
    return summary


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
