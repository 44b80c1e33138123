"""The in-process round loop: config → data → model+adapter → clients → aggregation → ledger → report.

:func:`prepare` validates everything and builds the job without writing a byte; :func:`run`
creates the run directory and trains. Library code never prints: progress goes to a callback.
"""

from __future__ import annotations

import json
from accounting.ledger import fsync_dir as _fsync_dir
import logging
import math
import os
import tempfile
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
from dpfed.adapters.init import (
    factors_from_gradient,
    fit_head_public,
    init_head_random,
    init_public,
    init_random,
    zero_factors,
)
from dpfed.adapters.lorasb import LoRASBLinear, load_trainable_state, trainable_state
from dpfed.aggregation import FedSBAggregator
from dpfed.client import Budget, Client, LocalTraining
from dpfed.config import RunConfig
from dpfed.data import (Splits, TokenizedShard, attach_prefix_cache, label_set, load_records, load_tokenizer, settle_labels,
                        split_and_partition, tokenize)
from dpfed.errors import ConfigError, DataError, Interrupted, RunComplete
from dpfed.model import DEFAULT_TARGETS, SequenceClassifier, _layer_index, load_base, model_family, inject_lorasb, resolve_model_path, select_targets
from dpfed.payload import FRAMING_BYTES, KIND_DOWN, KIND_UP, Manifest, encode
from dpfed.privacy import DPSGDParams, exact_rate, make_generator, new_seed, per_example_loss, sample_rate
from dpfed.release import SITE_LOCAL_DIR, release, unit_of

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
    split_seed: int | None = None  # recorded in run.json (never the noise seed when it came from OS entropy)
    client_noise_multiplier: float | None = None  # client-level σ_c (privacy.unit client|both)
    canaries: Any = None  # attacks.canaries.CanarySet when the run is audited
    attack_records: dict | None = None  # members / held-out non-members for the membership attacks
    method: Any = None  # dpfed.methods.FedSBMethod | LoRAMethod
    noise_enabled: bool = True  # False only for compare's noise-amplification twin (no guarantee)
    fixed_records: tuple = ()  # per client: the included white-box (gradient) canaries, FixedGradientRecords

    def population_sizes(self) -> list[int]:
        """Each client's n: its shard's records plus the gradient canaries it holds (q = b / n counts both)."""
        return _population_sizes(self.shards, self.fixed_records)

    @property
    def dp(self) -> bool:
        """Record-level DP-SGD on the clients."""
        return self.cfg.privacy.record_level

    @property
    def client_dp(self) -> bool:
        """Client-level DP-FedAvg on the server."""
        return self.cfg.privacy.client_level


def _population_sizes(shards: list[TokenizedShard], fixed_records: tuple) -> list[int]:
    return [len(s) + (len(fixed_records[i]) if fixed_records else 0) for i, s in enumerate(shards)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device must be available on this machine, got '{name}' (no CUDA device found)")
    return dev


def child_seed(seed: int, *path: int) -> int:
    """A 63-bit seed derived from ``seed`` along ``path`` (independent streams per purpose, site and round)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


def site_generators(seed: int, index: int, rnd: int, *, history: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """The sampling (CPU) and noise (``device``) generators of site ``index`` in round ``rnd``.

    ``history`` is how many records the site's own ledger holds before the round: mixing it in
    means a fixed seed never repeats its sampling and noise on the same ledger (a second run, or
    a round redone after a crash), while an in-process site and a Flower site with the same seed
    and ledger draw the same bits.
    """
    return (make_generator(child_seed(seed, 3, index, rnd, history)),
            make_generator(child_seed(seed, 4, index, rnd, history), device))


def prepare(cfg: RunConfig, *, progress: Progress = _noop, split_seed: int | None = None,
            data_from: Job | None = None) -> Job:
    """Validate the whole configuration against data and model and build the job. Writes nothing.

    ``split_seed`` fixes the data split (resume); by default it derives from a user seed or is
    drawn from OS entropy independently of the noise seed, so recording it reveals no noise.
    ``data_from`` reuses another job's split, tokenised shards and frozen-prefix caches (``dpfed
    compare``: same data and model, another method); it must have the same split seed and the
    same data and model settings, and no canaries.
    """
    t0 = time.time()
    seed_is_user = cfg.seed is not None
    seed = cfg.seed if seed_is_user else new_seed()
    if split_seed is None:
        split_seed = child_seed(seed, 1) if seed_is_user else new_seed()
    device = resolve_device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    task = cfg.model.task
    if data_from is not None:
        _check_reusable(cfg, data_from, split_seed)
    progress("setup", {"stage": "data"})
    data_notes: list[str] = []  # dropped records, declared public data: the CLI prints them
    records = load_records(cfg.data, task=task, notes=data_notes) if data_from is None else None
    public_file = (load_records(cfg.data, task=task, source=cfg.data.public_source, notes=data_notes)
                   if data_from is None and cfg.data.public_source else None)
    heldout = None
    n_holdout = 0 if data_from is not None else (
        cfg.data.audit_holdout or (min(500, len(records) // 20) if cfg.data.canaries else 0))
    if n_holdout:  # non-members for the membership attacks, set aside before anything else
        perm = np.random.default_rng(child_seed(split_seed, 9)).permutation(len(records))
        heldout, records = records.subset(np.sort(perm[:n_holdout])), records.subset(np.sort(perm[n_holdout:]))
    if data_from is None:
        splits = split_and_partition(records, cfg.data, seed=split_seed, public=public_file)
        # declared, or the test split's and public data's labels: never read from the private records
        splits = settle_labels(splits, label_set(splits, cfg.data), cfg.data)
        if heldout is not None:
            heldout = heldout.relabel(splits.test.label_names, source=cfg.data.source, column=cfg.data.label_column)
        progress("data", {"notes": data_notes + splits.public_notes()})
    else:
        splits = data_from.splits
    label_names = splits.test.label_names if splits.test.labels is not None else ()
    progress("setup", {"stage": "model"})
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path) if data_from is None else data_from.tokenizer
    canaries = attack_records = None
    if cfg.data.canaries and cfg.data.canary_kind == "random-words":
        # the audit's canaries go through exactly the same sampling, clipping and noise as real records;
        # imported lazily: only audited runs need the attacks package
        from attacks.canaries import make_canaries, plant

        canaries = make_canaries(m=cfg.data.canaries, label_names=label_names or None,
                                 num_clients=cfg.data.num_clients, seed=child_seed(split_seed, 6), tokenizer=tokenizer)
        splits = plant(splits, canaries, seed=child_seed(split_seed, 7))
    if heldout is not None:
        from attacks.canaries import choose_attack_records

        attack_records = choose_attack_records(splits, heldout=heldout, n=len(heldout), seed=child_seed(split_seed, 8),
                                               canaries=canaries)  # None for gradient canaries: they have no text
    num_labels = len(label_names)
    model = load_base(cfg.model.name, task=task, num_labels=max(num_labels, 2))
    if isinstance(model, SequenceClassifier) and label_names:  # the label <-> head index mapping, for the export
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model_type = getattr(model.config, "model_type", "")
    targets = cfg.model.target_modules or DEFAULT_TARGETS[model_family(model_type)]
    names = select_targets(model, tuple(targets), cfg.model.adapt_layers)
    method_name = cfg.train.method
    if method_name == "fed-sb":
        adapters = inject_lorasb(model, names, rank=cfg.model.rank)
    else:
        from dpfed.adapters.lora import inject_lora

        _check_rank(model, names, cfg.model.rank)
        adapters = inject_lora(model, names, rank=cfg.model.rank, alpha=cfg.model.lora_alpha or float(cfg.model.rank),
                               train_a=method_name != "ffa-lora", generator=make_generator(child_seed(seed, 2, 2)))
    model.to(device)
    fixed_records: tuple = ()
    if cfg.data.canaries and cfg.data.canary_kind == "gradient":
        # white-box canaries: distinct coordinates of the trainable parameters, bits from the split seed
        from attacks.canaries import make_gradient_canaries

        canaries = make_gradient_canaries(
            m=cfg.data.canaries, shapes={n: p.numel() for n, p in model.named_parameters() if p.requires_grad},
            num_clients=cfg.data.num_clients, seed=child_seed(split_seed, 6))
        fixed_records = tuple(canaries.fixed_records(i, clip=cfg.privacy.clip) for i in range(cfg.data.num_clients))
    ml = cfg.model.max_length
    if data_from is None:
        shards = [tokenize(c, tokenizer, max_length=ml) for c in splits.clients]
        test = tokenize(splits.test, tokenizer, max_length=ml)
    else:
        shards, test = data_from.shards, data_from.test
    sizes = _population_sizes(shards, fixed_records)
    n_min = min(sizes)
    if cfg.train.batch_size > n_min:
        raise ConfigError(f"batch_size must be <= the smallest client shard ({n_min} records), got {cfg.train.batch_size}")
    sigma = None
    if cfg.privacy.record_level:
        if cfg.privacy.delta >= 1.0 / n_min:
            raise ConfigError(f"delta must be < 1/n_min = {1.0 / n_min:.3g} (smallest client holds {n_min} records), got {cfg.privacy.delta:g}")
        sigma = cfg.privacy.noise_multiplier or calibrate(cfg, sizes)
    progress("setup", {"stage": "init", "strategy": cfg.init.strategy})
    gen = make_generator(child_seed(seed, 2))
    init_info: dict[str, Any] = {"public_records": len(splits.public)}
    init_head_random(model, generator=gen)
    lorasb_init = cfg.init.strategy if method_name == "fed-sb" else None  # LoRA baselines: PEFT's init (in inject_lora)
    needs_public = lorasb_init == "public" or (cfg.init.head == "public" and isinstance(model, SequenceClassifier))
    public = tokenize(splits.public, tokenizer, max_length=ml) if needs_public else None
    if public is not None and len(public) == 0:
        which = " and ".join(k for k, v in (("init.strategy", lorasb_init), ("init.head", cfg.init.head)) if v == "public")
        raise DataError(f"{which} 'public' needs records declared public, got 0: declare them with --public-data FILE "
                        f"(data.public_source) or --public-fraction F (data.public_fraction), or use 'random'")
    if cfg.init.head == "public" and isinstance(model, SequenceClassifier):
        init_info.update(fit_head_public(model, public, examples=cfg.init.public_examples, epochs=cfg.init.head_epochs,
                                         generator=gen, device=device))
    if isinstance(model, SequenceClassifier):  # where the classification head came from (the CLI prints it)
        init_info["head_source"] = splits.public_origin() if cfg.init.head == "public" else "random (data-free)"
    if lorasb_init is None:
        init_info["lora_init"] = 1.0  # A Kaiming-uniform from the run seed, B = 0 (PEFT's default)
    elif lorasb_init == "random":
        init_random(adapters, generator=gen)
    elif lorasb_init == "dp":
        zero_factors(adapters)  # the clients' accounted contributions set B, A, R in run(), once the ledger exists
    else:
        init_info.update(init_public(model, adapters, public, task=task, lr=cfg.init.lr,
                                     num_examples=cfg.init.public_examples, generator=gen, device=device))
    if data_from is not None and isinstance(model, SequenceClassifier):
        model.prefix_start = getattr(data_from.model, "prefix_start", 0)  # the shards carry its cached states
        init_info["prefix_cache_layers"] = float(model.prefix_start)
    elif cfg.model.prefix_cache and isinstance(model, SequenceClassifier):
        progress("setup", {"stage": "prefix cache"})
        init_info.update(enable_prefix_cache(model, names, shards + [test], device))
    client_sigma = client_noise_multiplier(cfg) if cfg.privacy.client_level else None
    from dpfed.methods import FedSBMethod, LoRAMethod

    weighting = "uniform" if cfg.privacy.client_level else cfg.train.weighting
    method = (FedSBMethod(model, adapters, weighting=weighting) if method_name == "fed-sb"
              else LoRAMethod(method_name, model, adapters, weighting=weighting, seed=seed))
    return Job(cfg, model, adapters, tokenizer, splits, test, shards, device, autocast_dtype, seed, seed_is_user,
               sigma, init_info, time.time() - t0, split_seed, client_sigma, canaries, attack_records, method,
               fixed_records=fixed_records)


def _check_reusable(cfg: RunConfig, other: Job, split_seed: int) -> None:
    same = (cfg.data == other.cfg.data and cfg.model.name == other.cfg.model.name
            and cfg.model.max_length == other.cfg.model.max_length and cfg.model.adapt_layers == other.cfg.model.adapt_layers
            and cfg.model.target_modules == other.cfg.model.target_modules and cfg.model.prefix_cache == other.cfg.model.prefix_cache
            and cfg.device == other.cfg.device and split_seed == other.split_seed and not cfg.data.canaries)
    if not same:
        raise ValueError("data_from must share data, model, device settings and split seed, and have no canaries")


def _check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    for n in names:
        d_out, d_in = model.get_submodule(n).weight.shape
        if rank > min(d_out, d_in):
            raise ConfigError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)} of {n}, got {rank}")


def enable_prefix_cache(model: SequenceClassifier, names: list[str], shards: list[TokenizedShard],
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


def dp_init_params(cfg: RunConfig) -> DPSGDParams:
    i = cfg.init
    return DPSGDParams(noise_multiplier=i.dp_noise_multiplier, clip=i.dp_clip, expected_batch_size=i.dp_batch_size)


def calibrate(cfg: RunConfig, sizes: list[int]) -> float:
    """σ such that the client with the most compositions ends at or below ε after all planned rounds.

    With ``init: dp`` each client's initialisation event is part of its plan (same total ε).
    """
    from accounting.errors import AccountingInputError
    from accounting.events import PoissonGaussianEvent
    from accounting.planning import calibrate_noise

    steps = cfg.train.rounds * cfg.train.local_steps
    if cfg.init.strategy != "dp":
        workloads = [(sample_rate(cfg.train.batch_size, n), steps) for n in sizes]
        return calibrate_noise(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, workloads=workloads)
    sigmas = []
    for n in sorted(set(sizes)):  # the init event differs per client size: plan each distinct size
        init_ev = PoissonGaussianEvent(noise_multiplier=cfg.init.dp_noise_multiplier,
                                       sample_rate=sample_rate(cfg.init.dp_batch_size, n), count=1)
        try:
            sigmas.append(calibrate_noise(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
                                          workloads=[(sample_rate(cfg.train.batch_size, n), steps)], fixed_events=[init_ev]))
        except AccountingInputError:
            raise ConfigError(f"init.dp_noise_multiplier must leave budget for training: the DP initialisation alone "
                              f"spends the whole epsilon {cfg.privacy.epsilon:g} for a client of {n} records, "
                              f"got {cfg.init.dp_noise_multiplier:g}") from None
    return max(sigmas)


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


RUN_JSON = "run.json"
LABELS_JSON = "labels.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
LEDGER = "ledger.jsonl"
SERVER_LEDGER = "server_ledger.jsonl"
SERVER_ID = "all-clients"  # the server ledger's one account: the client-level guarantee holds for every client
CLIENT_TRUST = "requires a trusted aggregator (the server adds the noise)"


def client_noise_multiplier(cfg: RunConfig) -> float:
    """Client-level σ_c: given, or calibrated so that all planned rounds end at client_epsilon."""
    p, n = cfg.privacy, cfg.data.num_clients
    delta = p.client_delta_value
    if delta >= 1.0 / n:
        raise ConfigError(f"client_delta must be < 1/num_clients = {1.0 / n:.3g} for client-level DP, got {delta:g}")
    if p.client_noise_multiplier is not None:
        return p.client_noise_multiplier
    from accounting.planning import calibrate_noise

    return calibrate_noise(target_epsilon=p.client_epsilon, delta=delta,
                           workloads=[(exact_rate(cfg.train.client_fraction), cfg.train.rounds)], unit="client")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over ``path``, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, fsync, rename)."""
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def save_checkpoint(run_dir: Path, *, round: int, global_state: dict[str, torch.Tensor],
                    frozen: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write the global trainable state, the frozen B and A, and ``meta`` (round, ledger heads).

    The safetensors file carries its metadata inside, so the state and the round it belongs to
    are replaced together; ``checkpoint.json`` is a readable copy written after it.
    """
    from safetensors.torch import save

    tensors = {f"trainable/{k}": v.detach().cpu().contiguous() for k, v in global_state.items()}
    for name, value in frozen.items():  # the method's frozen but run-specific tensors (B, A; folded W0)
        tensors[f"frozen/{name}"] = value.detach().cpu().contiguous()
    meta = release("checkpoint", {"round": round, **meta}, unit="both")  # every field is releasable under every unit
    _atomic_write(run_dir / CHECKPOINT, save(tensors, metadata={"dpfed": json.dumps(meta)}))
    write_json(run_dir / CHECKPOINT_JSON, meta)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(meta, trainable state, frozen factors)`` from ``checkpoint.safetensors``."""
    from safetensors import safe_open

    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path}: no checkpoint (the run stopped before its first round began); start a new run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["dpfed"])
            trainable = {k[len("trainable/"):]: fh.get_tensor(k) for k in fh.keys() if k.startswith("trainable/")}
            frozen = {k[len("frozen/"):]: fh.get_tensor(k) for k in fh.keys() if k.startswith("frozen/")}
    except Exception as exc:  # SafetensorError, OSError, a missing or bad metadata entry: all mean a damaged file
        raise ConfigError(f"{path}: the checkpoint is damaged and cannot be read ({type(exc).__name__}); the ledger "
                          f"still holds every spent event: start a new run (dpfed budget {run_dir} shows the spend)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("round"), int):
        raise ConfigError(f"{path}: the checkpoint's metadata must carry its round, got {meta!r:.80}")
    return meta, trainable, frozen


def _head(ledger) -> list:
    seq, digest = ledger.head
    return [seq, digest]


def _open_ledger(path: Path, expected_head: list | None, fallback_events: Callable[[], list[tuple[str, int, Any]]], *,
                 key: bytes | None = None):
    """Open a ledger for resuming; repair a torn last line conservatively (its event stays counted).

    A complete torn fragment is re-appended as it was; an unparsable one is replaced by
    ``fallback_events()``, the events that could have been in flight (over-count, never under-count).
    """
    from accounting.errors import LedgerCorruptError
    from accounting.ledger import REAPPEND_NOTE, Ledger, reappend_torn

    try:
        ledger = Ledger(path, key=key)
    except LedgerCorruptError as exc:
        if "truncated last line" not in str(exc):
            raise
        ledger, torn = Ledger.recover(path, key=key)
        if torn is not None and reappend_torn(ledger, torn) is None:
            for client, rnd, event in fallback_events():
                ledger.append(client=client, round=rnd, event=event, note=REAPPEND_NOTE)
    if expected_head is not None:
        Ledger(path, expected_head=(int(expected_head[0]), str(expected_head[1])), key=key)  # lines lost at the end?
    return ledger


def run(job: Job, run_dir: Path, *, progress: Progress = _noop, ledger_key: bytes | None = None,
        claimed: bool | None = None) -> dict[str, Any]:
    """Train for the configured rounds; write the run directory; return the summary.

    The noise-free twin of ``dpfed compare`` (``job.noise_enabled`` False) releases no noised
    value, so it claims nothing: its ledger lives in a scratch folder that is deleted afterwards
    (it only keeps the per-site draws equal to the noised run's), it writes no ``budget.json``,
    and its summary has no ε.

    ``claimed``: None to claim ``run_dir`` here; otherwise the caller already claimed it with
    :func:`claim_run_dir`, which returned this value (whether it created the directory).
    """
    run_dir = Path(run_dir)
    created = claim_run_dir(run_dir) if claimed is None else claimed  # claimed: the caller claimed it (True: created)
    try:
        if not job.noise_enabled:
            with tempfile.TemporaryDirectory(prefix="dpfed-twin-ledger-") as scratch:
                return _run(job, run_dir, ledger_dir=Path(scratch), progress=progress, ledger_key=None)
        return _run(job, run_dir, ledger_dir=run_dir, progress=progress, ledger_key=ledger_key)
    except KeyboardInterrupt:
        raise _interrupted(run_dir, created=created) from None


CLAIM = ".dpfed-claim"  # created with O_EXCL in a run directory before any work: one run per directory


def claim_run_dir(run_dir: Path) -> bool:
    """Make ``run_dir`` this run's before any work: a new directory, or an existing empty one; True if created here.

    The claim is a marker file created with ``O_EXCL``: of two runs started on the same ``--out``,
    the second gets a one-line error at once. An empty directory the user made is used as it
    is and never removed.
    """
    run_dir = Path(run_dir)
    created = False
    if not run_dir.exists():
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass  # another run made it a moment ago: the claim below decides
        except OSError as exc:
            raise ConfigError(f"out must be a directory dpfed can create, got '{run_dir}' ({exc.strerror})") from None
    if not run_dir.is_dir() or (not created and any(p.name != CLAIM for p in run_dir.iterdir())):
        raise ConfigError(f"out must be a new or empty directory, got existing '{run_dir}'")
    try:
        os.close(os.open(run_dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise ConfigError(f"out must not be in use by another run, got '{run_dir}' (it holds {CLAIM})") from None
    except OSError as exc:
        if created:
            run_dir.rmdir()
        raise ConfigError(f"out must be a writable directory, got '{run_dir}' ({exc.strerror})") from None
    return created


def release_claim(run_dir: Path, *, created: bool) -> None:
    """Undo :func:`claim_run_dir` when nothing else was written (setup failed): remove only what dpfed made."""
    run_dir = Path(run_dir)
    (run_dir / CLAIM).unlink(missing_ok=True)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _interrupted(run_dir: Path, *, created: bool) -> Interrupted:
    """Leave ``run_dir`` resumable, or remove what this run created when nothing is resumable and nothing was spent."""
    if (run_dir / CHECKPOINT_JSON).is_file():
        try:
            rnd = int(json.loads((run_dir / CHECKPOINT_JSON).read_text())["round"])
        except (OSError, ValueError, KeyError, TypeError):
            rnd = None
        if rnd is not None and (run_dir / RUN_JSON).is_file():
            return Interrupted(f"interrupted after round {rnd}; resume with: dpfed train --resume {run_dir}",
                               run_dir=run_dir, round=rnd)
    spent = sum(1 for name in (LEDGER, SERVER_LEDGER) if (run_dir / name).is_file() and (run_dir / name).stat().st_size)
    if spent:  # the ledger holds released events: keep it (dpfed budget reads it), say the run cannot resume
        return Interrupted(f"interrupted during setup, after privacy was spent (see dpfed budget {run_dir}); this "
                           f"directory cannot be resumed: start a new run with another --out", run_dir=run_dir, round=None)
    for child in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        child.unlink() if not child.is_dir() or child.is_symlink() else child.rmdir()
    if created:
        run_dir.rmdir()
    return Interrupted(f"interrupted during setup; nothing was spent and {run_dir} was "
                       f"{'removed' if created else 'emptied'}", run_dir=run_dir, round=None)


def _run(job: Job, run_dir: Path, *, ledger_dir: Path, progress: Progress, ledger_key: bytes | None) -> dict[str, Any]:
    from accounting.ledger import Ledger

    cfg = job.cfg
    config_text = config_mod.to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_text)
    if job.splits.test.labels is not None:  # head index -> label (declared, or from the test split and public data)
        write_json(run_dir / LABELS_JSON, {str(i): name for i, name in enumerate(job.splits.test.label_names)})
    if job.canaries is not None:
        from attacks.canaries import save_canaries

        save_canaries(run_dir / "canaries.json", job.canaries)
    if job.attack_records is not None:
        from attacks.canaries import save_attack_records

        save_attack_records(run_dir / "attack_records.json", job.attack_records)
    if (job.dp or job.client_dp) and job.noise_enabled:
        budget_info: dict[str, Any] = {"accountant": "prv"}
        if job.dp:
            budget_info.update(epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, privacy_unit="record")
        if job.client_dp:
            budget_info["client_level"] = {"epsilon": cfg.privacy.client_epsilon, "delta": cfg.privacy.client_delta_value}
        write_json(run_dir / "budget.json", budget_info)
    ledger = Ledger(ledger_dir / LEDGER, key=ledger_key)
    server_ledger = Ledger(ledger_dir / SERVER_LEDGER, key=ledger_key) if job.client_dp else None
    if cfg.data.canary_clients:
        from attacks.client_canaries import CANARY_CLIENTS_FILE, save

        save(run_dir / CANARY_CLIENTS_FILE, _canary_clients(job))
    if cfg.init.strategy == "dp":
        progress("setup", {"stage": "init", "strategy": "dp"})
        job.init_info.update(_dp_init(job, ledger))
    global_state = trainable_state(job.model)
    save_state(run_dir / "initial_state.safetensors", global_state)
    eval0 = evaluate(job.model, job.test, task=cfg.model.task, device=job.device, batch_size=cfg.train.eval_batch_size,
                     autocast_dtype=job.autocast_dtype)
    # never the noise/sampling seed unless the user chose it: knowing it would let anyone subtract the noise
    write_json(run_dir / RUN_JSON, {
        "config_sha256": sha256_hex(config_text.encode()),
        "split_seed": job.split_seed,
        "seed": job.seed if job.seed_is_user else None,
        "noise_multiplier": job.noise_multiplier,
        "client_noise_multiplier": job.client_noise_multiplier,
        "init_info": job.init_info,
        "initial_eval": eval0,
    })
    save_checkpoint(run_dir, round=0, global_state=global_state, frozen=job.method.frozen_state(),
                    meta=checkpoint_meta(run_dir, ledger, server_ledger))
    return _train(job, run_dir, ledger=ledger, server_ledger=server_ledger, global_state=global_state,
                  start_round=1, seed=job.seed, eval0=eval0, progress=progress, resumed=None)


def _canary_clients(job: Job):
    """The client-level audit's canary clients (directions and bits from the split seed, never the noise seed)."""
    from attacks.client_canaries import make_canary_clients

    return make_canary_clients(k=job.cfg.data.canary_clients, state=trainable_state(job.model),
                               seed=child_seed(job.split_seed, 10))


def make_clients(job: Job, *, ledger, seed: int, diagnostics_dir: Path | None = None) -> list[Client]:
    """One :class:`Client` per shard, with generators derived from ``seed`` and the job's gradient canaries.

    ``diagnostics_dir``: where each simulated site keeps its own un-noised diagnostics (mode 0600,
    outside the guarantee; never released).
    """
    cfg = job.cfg
    budget = Budget(cfg.privacy.epsilon, cfg.privacy.delta) if job.dp else None
    training = LocalTraining(local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                             optimizer=cfg.train.optimizer, momentum=cfg.train.momentum, task=cfg.model.task)
    clients = []
    fixed = job.fixed_records or (None,) * len(job.shards)
    for i, shard in enumerate(job.shards):
        dp = (DPSGDParams(noise_multiplier=job.noise_multiplier, clip=cfg.privacy.clip,
                          expected_batch_size=cfg.train.batch_size) if job.dp else None)
        clients.append(Client(client_id=f"client-{i:03d}", shard=shard, training=training, dp=dp,
                              sample_generator=make_generator(child_seed(seed, 3, i)),
                              noise_generator=make_generator(child_seed(seed, 4, i), job.device) if job.dp else None,
                              ledger=ledger, budget=budget, device=job.device, autocast_dtype=job.autocast_dtype,
                              noise_enabled=job.noise_enabled, fixed=fixed[i],
                              diagnostics=None if diagnostics_dir is None else diagnostics_dir / f"client-{i:03d}.jsonl"))
    return clients


def _dp_init(job: Job, ledger) -> dict[str, float]:
    """``init: dp``: every client releases a clipped, noised gradient sum (its ledger first); the server signs and SVDs.

    Round 0 of each client's ledger holds the event. Per-client generators derive from the run
    seed at round 0, which no training round uses.
    """
    from accounting.prv import epsilon as prv_epsilon

    params = dp_init_params(job.cfg)
    clients = make_clients(job, ledger=ledger, seed=job.seed)
    zero_factors(job.adapters)  # the estimate is taken at W0
    total: dict[str, torch.Tensor] = {}
    for i, c in enumerate(clients):
        sample_gen, noise_gen = site_generators(job.seed, i, 0, history=len(ledger.events(c.client_id)),
                                                device=job.device)
        part = c.init_contribution(job.model, job.adapters, params=params, sample_generator=sample_gen,
                                   noise_generator=noise_gen)
        for n, v in part.items():
            total[n] = total[n] + v if n in total else v
    factors_from_gradient(job.adapters, total, lr=job.cfg.init.lr, generator=make_generator(child_seed(job.seed, 2, 1)))
    values = sum(a.out_features * a.in_features for a in job.adapters.values())
    eps_init = max(prv_epsilon([c.init_event(params)], delta=job.cfg.privacy.delta).upper for c in clients)
    return {"dp_init_noise_multiplier": params.noise_multiplier, "dp_init_clip": params.clip,
            "dp_init_batch_size": params.expected_batch_size, "dp_init_epsilon_alone": eps_init,
            "dp_init_contributors": float(len(clients)), "dp_init_bytes_up_per_client": float(4 * values + FRAMING_BYTES)}


def checkpoint_meta(run_dir: Path, ledger, server_ledger) -> dict[str, Any]:
    """What a checkpoint records besides the states: the ledgers' head hashes and the config's hash."""
    return {"ledger_head": _head(ledger), "server_ledger_head": _head(server_ledger) if server_ledger else None,
            "config_sha256": sha256_hex((run_dir / "config.yaml").read_bytes()), "ledger_keyed": ledger.keyed}


def resume(run_dir: Path, *, progress: Progress = _noop, device: str | None = None,
           ledger_key: bytes | None = None) -> dict[str, Any]:
    """Continue a run from its last checkpoint and its ledgers; return the new summary.

    Rounds the ledger holds beyond the checkpoint (a crash after a client appended its events
    but before the round's checkpoint) stay counted: the resumed run over-counts, never under-counts.
    Sampling and noise get fresh OS-entropy seeds unless the run was started with a user seed,
    in which case per-round seeds derive from it and the resumed run is reproducible.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / RUN_JSON).is_file():
        raise ConfigError(f"--resume must name a run directory with config.yaml and {RUN_JSON}, got '{run_dir}'")
    if (run_dir / "summary.json").is_file():  # written only when a run ends (all rounds, or a budget stop)
        from dpfed.jsonio import read_json_object

        raise RunComplete(run_dir, read_json_object(run_dir / "summary.json", what="summary"))
    config_text = (run_dir / "config.yaml").read_bytes()
    info = json.loads((run_dir / RUN_JSON).read_text())
    meta, trainable, frozen = load_checkpoint(run_dir)
    digest = sha256_hex(config_text)
    if digest != info["config_sha256"] or digest != meta["config_sha256"]:
        raise ConfigError(f"{run_dir}/config.yaml changed since the run started (sha256 mismatch); refusing to resume")
    cfg = config_mod.from_dict(__import__("yaml").safe_load(config_text))
    if device is not None:
        cfg = config_mod.override(cfg, device=device)
    # rebuild data split and model; the adapter factors and state come from the checkpoint, so init is skipped
    cheap = config_mod.override(cfg, **{"init.strategy": "random", "init.head": "random",
                                        "privacy.noise_multiplier": info["noise_multiplier"],
                                        "privacy.client_noise_multiplier": info.get("client_noise_multiplier")})
    job = prepare(cheap, progress=progress, split_seed=int(info["split_seed"]))
    job.cfg, job.init_info = cfg, info.get("init_info", {})
    if info.get("seed") is None:  # the original seed came from OS entropy and was never recorded: draw a new one
        job.seed, job.seed_is_user = new_seed(), False
    else:
        job.seed, job.seed_is_user = int(info["seed"]), True
    job.method.load_frozen_state(frozen)
    load_trainable_state(job.model, trainable)
    start = int(meta["round"]) + 1
    n_clients = len(job.shards)
    from accounting.events import PoissonGaussianEvent

    def in_flight_record() -> list[tuple[str, int, Any]]:
        evs = [] if not job.dp else [PoissonGaussianEvent(noise_multiplier=job.noise_multiplier, sample_rate=sample_rate(
            cfg.train.batch_size, n), count=cfg.train.local_steps) for n in job.population_sizes()]
        return [(f"client-{i:03d}", start, ev) for i, ev in enumerate(evs)]

    def in_flight_server() -> list[tuple[str, int, Any]]:
        return [(SERVER_ID, start, _server_event(job))]

    ledger = _open_ledger(run_dir / LEDGER, meta["ledger_head"], in_flight_record, key=ledger_key)
    server_ledger = (_open_ledger(run_dir / SERVER_LEDGER, meta.get("server_ledger_head"), in_flight_server,
                                  key=ledger_key) if job.client_dp else None)
    if ledger.keyed and not ledger.mac_verified:
        raise ConfigError(f"--ledger-key must be given to resume {run_dir}: its ledger is keyed (HMAC), got no key")
    from dpfed.rundir_check import verify_run_ledgers

    verify_run_ledgers(run_dir, key=ledger_key)  # a torn line is repaired above; the rest must agree with the checkpoint
    if job.dp:  # refuse at once if the ledger already holds more than the budget
        from accounting.prv import epsilon as prv_epsilon

        for i in range(n_clients):
            cid = f"client-{i:03d}"
            eps = prv_epsilon(ledger.events(cid), delta=cfg.privacy.delta).upper
            if eps > cfg.privacy.epsilon:
                raise ConfigError(f"client {cid} has already spent epsilon {eps:.4f} > budget {cfg.privacy.epsilon:g} "
                                  f"(over by {eps - cfg.privacy.epsilon:.4f}); refusing to resume")
    _truncate_metrics(run_dir / "metrics.jsonl", last_round=start - 1)
    eval0 = info.get("initial_eval") or {}
    log.info("resuming %s at round %d (ledger holds %d records)", run_dir, start, len(ledger))
    try:
        return _train(job, run_dir, ledger=ledger, server_ledger=server_ledger, global_state=trainable_state(job.model),
                      start_round=start, seed=job.seed, eval0=eval0, progress=progress,
                      resumed={"from_round": start - 1, "ledger_records": len(ledger)})
    except KeyboardInterrupt:
        raise _interrupted(run_dir, created=False) from None


def _truncate_metrics(path: Path, *, last_round: int) -> None:
    """Keep complete metric lines up to ``last_round`` (a crash may leave a later or torn line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] <= last_round:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    _atomic_write(path, "".join(x + "\n" for x in keep).encode())


def _server_event(job: Job):
    from accounting.events import PoissonGaussianEvent

    return PoissonGaussianEvent(noise_multiplier=job.client_noise_multiplier, sample_rate=exact_rate(job.cfg.train.client_fraction),
                                count=1, unit="client")


def _client_level_epsilon(job: Job, server_ledger, extra: int = 0) -> float:
    from accounting.prv import epsilon as prv_epsilon

    events = server_ledger.events(SERVER_ID) + [_server_event(job)] * extra
    return prv_epsilon(events, delta=job.cfg.privacy.client_delta_value).upper


def _train(job: Job, run_dir: Path, *, ledger, server_ledger, global_state: dict[str, torch.Tensor], start_round: int,
           seed: int, eval0: dict[str, float], progress: Progress, resumed: dict[str, Any] | None) -> dict[str, Any]:
    from dpfed.aggregation import ClientLevelDP
    from accounting.prv import epsilon as prv_epsilon

    cfg, model, device = job.cfg, job.model, job.device
    t_start = time.time()
    clients = make_clients(job, ledger=ledger, seed=seed, diagnostics_dir=run_dir / SITE_LOCAL_DIR)
    q_client = exact_rate(cfg.train.client_fraction)  # numpy's random() draws k / 2**53: exactly q on the grid
    if job.client_dp:  # DP-FedAvg: uniform weights, Poisson client sampling at rate q, fixed denominator q·N
        aggregator: Any = ClientLevelDP(FedSBAggregator(weighting="uniform"), clip=cfg.privacy.client_clip,
                                        noise_multiplier=job.client_noise_multiplier,
                                        expected_clients=q_client * len(clients), generator=make_generator(0))
    else:
        aggregator = job.method
    canary_clients = _canary_clients(job) if cfg.data.canary_clients else None
    manifest = Manifest.of(global_state)
    up_size = len(encode(global_state, manifest, round=0, kind=KIND_UP))  # fixed by the manifest
    down_state = global_state  # what the server sends at the start of the next round (method-specific)
    agg_errors: list[float] = []
    per_round = max(1, int(math.ceil(q_client * len(clients))))
    load_trainable_state(model, global_state)
    last_eval = evaluate(model, job.test, task=cfg.model.task, device=device, batch_size=cfg.train.eval_batch_size,
                         autocast_dtype=job.autocast_dtype)
    progress("start", {"rounds": cfg.train.rounds - start_round + 1, "clients_per_round": per_round,
                       "local_steps": cfg.train.local_steps, "eval": last_eval, "noise_multiplier": job.noise_multiplier})
    bytes_up, bytes_down, stop_reason = [], [], "completed"
    rounds_done = start_round - 1
    metrics_path = run_dir / "metrics.jsonl"
    for rnd in range(start_round, cfg.train.rounds + 1):
        # per-round seeds: a run resumed at any round draws what an uninterrupted one would
        for i, c in enumerate(clients):
            c.sample_generator, noise = site_generators(seed, i, rnd, history=len(ledger.events(c.client_id)),
                                                        device=device)
            if job.dp:
                c.noise_generator = noise
        select_gen = np.random.default_rng(child_seed(seed, 5, rnd))
        if job.client_dp:  # Poisson: each client independently with probability q (the accounting needs it)
            chosen = [i for i in range(len(clients)) if select_gen.random() < q_client]
            aggregator.generator = make_generator(child_seed(seed, 6, rnd))
        else:
            chosen = sorted(select_gen.choice(len(clients), size=per_round, replace=False).tolist())
        try:
            for i in chosen:
                clients[i].check_budget()
            if job.client_dp and cfg.privacy.client_epsilon is not None:
                eps_c = _client_level_epsilon(job, server_ledger, extra=1)
                if eps_c > cfg.privacy.client_epsilon:
                    from dpfed.errors import BudgetError

                    raise BudgetError(f"client-level epsilon would reach {eps_c:.4f} > budget {cfg.privacy.client_epsilon:g} "
                                      f"(over by {eps_c - cfg.privacy.client_epsilon:.4f}) if the server released another "
                                      f"round; refusing")
        except Exception as exc:  # BudgetError: stop before anyone passes the budget
            stop_reason = str(exc)
            log.warning("stopping before round %d: %s", rnd, exc)
            break
        t_round = time.time()
        down = encode(down_state, Manifest.of(down_state), round=rnd, kind=KIND_DOWN)
        results, ups = [], []
        for i in chosen:
            progress("client", {"round": rnd, "client": clients[i].client_id})
            res = clients[i].fit(model, global_state, round=rnd,
                                 on_step=lambda: progress("step", {"round": rnd}))
            msg = encode(res.state, manifest, round=rnd, kind=KIND_UP)
            ups.append(len(msg))
            bytes_down.append(len(down))
            results.append(res)
        states, sizes = [r.state for r in results], [r.num_examples for r in results]
        if canary_clients is not None:  # client-level audit: included canaries, Poisson-sampled like every client
            from attacks.client_canaries import canary_state

            cgen = np.random.default_rng(child_seed(seed, 12, rnd))
            for k, inside in enumerate(canary_clients.included):
                if cgen.random() < q_client and inside:
                    states.append(canary_state(global_state, canary_clients, k, clip=cfg.privacy.client_clip))
                    sizes.append(1)
        if job.client_dp:
            global_state = down_state = aggregator.aggregate(states, sizes, global_state=global_state)
            # write-ahead: the server's event is durable before the noised state is released
            server_ledger.append(client=SERVER_ID, round=rnd, event=_server_event(job))
        elif results:
            agg = aggregator.aggregate(states, sizes, round=rnd)  # folds into W0 where the method does
            global_state, down_state = agg.state, agg.down
            agg_errors.append(agg.error)
        bytes_up.extend(ups)
        load_trainable_state(model, global_state)
        ev = evaluate(model, job.test, task=cfg.model.task, device=device, batch_size=cfg.train.eval_batch_size,
                      autocast_dtype=job.autocast_dtype)
        last_eval = ev
        claims = job.noise_enabled  # the noise-free twin claims no ε
        eps_clients = {c.client_id: prv_epsilon(ledger.events(c.client_id), delta=cfg.privacy.delta).upper
                       for c in clients} if job.dp and claims else {}
        # through the release boundary: under client-level DP the sampled sites, their count and anything
        # computed from single sites' updates are withheld (dpfed.release declares every field)
        line = release("metrics", {
            "round": rnd, "clients": [clients[i].client_id for i in chosen], **ev,
            "epsilon_spent": max(eps_clients.values()) if eps_clients else None,
            "bytes_up": sum(ups), "bytes_down": len(down) * len(chosen), "bytes_up_per_site": up_size,
            "aggregation_error": agg_errors[-1] if results and not job.client_dp else None,
            "seconds": time.time() - t_round,
            **({"client_level_epsilon": _client_level_epsilon(job, server_ledger)} if job.client_dp and claims else {}),
        }, unit=unit_of(cfg))
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        # the round's metrics line first, then its checkpoint: an interruption between the two leaves a line
        # that resume drops (it redoes the round), never a checkpointed round without its line
        save_checkpoint(run_dir, round=rnd, global_state=global_state, frozen=job.method.frozen_state(),
                        meta=checkpoint_meta(run_dir, ledger, server_ledger))
        rounds_done = rnd
        progress("round", line)
    job.method.export(run_dir / "adapter", task=cfg.model.task, base_model=cfg.model.name)
    eps_clients = ({c.client_id: prv_epsilon(ledger.events(c.client_id), delta=cfg.privacy.delta) for c in clients}
                   if job.dp and job.noise_enabled else {})
    trainable = sum(v.numel() for v in global_state.values())
    client_level = None
    if job.client_dp and job.noise_enabled:
        client_level = {
            "guarantee": "client-level DP (DP-FedAvg): adding or removing one client's whole data",
            "epsilon": _client_level_epsilon(job, server_ledger), "delta": cfg.privacy.client_delta_value,
            "epsilon_target": cfg.privacy.client_epsilon, "noise_multiplier": job.client_noise_multiplier,
            "clip": cfg.privacy.client_clip, "sampling": f"Poisson, each client independently with q = {q_client:g}",
            "rounds_released": len(server_ledger.events(SERVER_ID)), "accountant": "prv (upper bound)",
            "ledger": SERVER_LEDGER, "trust": CLIENT_TRUST,
        }
    summary = build_summary(job, eps_clients=eps_clients, sample_rates={c.client_id: c.sample_rate for c in clients},
                            client_sizes={c.client_id: c.num_examples for c in clients}, clients_per_round=per_round,
                            rounds_done=rounds_done, stop_reason=stop_reason, resumed=resumed, eval0=eval0,
                            last_eval=last_eval, bytes_up=bytes_up, bytes_down=bytes_down, agg_errors=agg_errors,
                            trainable=trainable, t_start=t_start, client_level=client_level)
    write_json(run_dir / "summary.json", summary)
    return summary


def build_summary(job: Job, *, eps_clients: dict[str, Any], sample_rates: dict[str, float], client_sizes: dict[str, int],
                  clients_per_round: int, rounds_done: int, stop_reason: str, resumed: dict[str, Any] | None,
                  eval0: dict[str, float], last_eval: dict[str, float], bytes_up: list[int], bytes_down: list[int],
                  agg_errors: list[float], trainable: int, t_start: float,
                  client_level: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json`` of a finished run (the in-process runner and the Flower server write the same keys)."""
    return release("summary", _summary_fields(job, eps_clients=eps_clients, sample_rates=sample_rates,
                                              client_sizes=client_sizes, clients_per_round=clients_per_round,
                                              rounds_done=rounds_done, stop_reason=stop_reason, resumed=resumed,
                                              eval0=eval0, last_eval=last_eval, bytes_up=bytes_up,
                                              bytes_down=bytes_down, agg_errors=agg_errors, trainable=trainable,
                                              t_start=t_start, client_level=client_level),
                   unit=unit_of(job.cfg))


def _summary_fields(job: Job, *, eps_clients, sample_rates, client_sizes, clients_per_round, rounds_done, stop_reason,
                    resumed, eval0, last_eval, bytes_up, bytes_down, agg_errors, trainable, t_start,
                    client_level) -> dict[str, Any]:
    cfg = job.cfg
    record_label = "record-level DP per client (local DP-SGD)"
    claims = cfg.privacy.enabled and job.noise_enabled
    privacy = ("none (--no-dp): no privacy guarantee" if not cfg.privacy.enabled else
               "none (noise-free twin of dpfed compare): no privacy guarantee" if not job.noise_enabled else
               {"record": record_label, "client": "client-level DP only (DP-FedAvg, trusted server)",
                "both": record_label + " and, separately, client-level DP (DP-FedAvg, trusted server)"}[cfg.privacy.unit])
    return {
        "method": cfg.train.method,
        "privacy": privacy,
        "privacy_unit": cfg.privacy.unit if claims else None,
        "epsilon_target": cfg.privacy.epsilon if job.dp and claims else None,
        "delta": cfg.privacy.delta if job.dp and claims else None,
        "epsilon_spent": max(e.upper for e in eps_clients.values()) if eps_clients else None,
        "epsilon_per_client": {k: e.upper for k, e in eps_clients.items()},
        "accountant": "prv (upper bound)" if job.dp and claims else None,
        "noise_multiplier": job.noise_multiplier,
        "clip": cfg.privacy.clip if job.dp else None,
        "client_level": client_level,
        "sample_rates": sample_rates,
        "rounds_planned": cfg.train.rounds,
        "rounds_completed": rounds_done,
        "stop_reason": stop_reason,
        "resumed": resumed,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "clients": len(client_sizes),
        "clients_per_round": clients_per_round,
        "client_sizes": client_sizes,
        "init": cfg.init.strategy if cfg.train.method == "fed-sb" else "peft-default (A Kaiming-uniform, B = 0)",
        "noise": "enabled" if job.noise_enabled else "DISABLED (noise-amplification twin: no privacy guarantee)",
        "init_info": job.init_info,
        "initial_eval": eval0,
        "accuracy": last_eval.get("accuracy"),
        "eval_loss": last_eval["eval_loss"],
        "test_examples": len(job.test),
        "bytes_up_per_client_round": int(np.mean(bytes_up)) if bytes_up else 0,
        "bytes_down_per_client_round": int(np.mean(bytes_down)) if bytes_down else 0,
        "payload_values": trainable,
        "payload_formula": job.method.payload_formula(trainable),
        "aggregation_error": agg_errors[-1] if agg_errors else None,
        "aggregation_error_max": max(agg_errors) if agg_errors else None,
        "framing_bytes": FRAMING_BYTES,
        "trainable_params": trainable,
        "adapted_layers": len(job.adapters),
        "rank": cfg.model.rank,
        "wall_seconds": time.time() - t_start,
        "setup_seconds": job.setup_seconds,
        "device": str(job.device) + (f" ({torch.cuda.get_device_name(job.device)})" if job.device.type == "cuda" else ""),
        "seed": job.seed if job.seed_is_user else "os-entropy (not recorded)",
        "data_fingerprints": {"test": job.splits.test.fingerprint(), "public": job.splits.public.fingerprint()},
    }


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
