"""Setup: configuration → data → model + adapters → a frozen job description. Writes nothing.

:func:`prepare` validates the whole configuration against the data and the model, splits and
tokenises the data, builds the model with the method's adapters, initialises them, calibrates
σ, and returns a :class:`Job`, which nothing mutates afterwards (derive a variant with
``dataclasses.replace``). Audit canaries come in through an :class:`AuditPlan` built by the
``attacks`` package: dpfed's core never imports ``attacks``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from accounting.sampling import exact_rate, sample_rate
from dpfed.adapters.init import fit_head_public, init_head_random, init_public, init_random, zero_factors
from dpfed.adapters.lorasb import LoRASBLinear
from dpfed.client import Budget, Client, LocalTraining
from dpfed.config import RunConfig
from dpfed.data import (Records, Splits, TokenizedShard, attach_prefix_cache, label_set, load_records, load_tokenizer,
                        settle_labels, split_and_partition, tokenize)
from dpfed.errors import ConfigError, DataError
from dpfed.instruct import InstructShard, enable_prefix, load_chat_tokenizer, load_prompt_response, tokenize_instruct
from dpfed.families import default_targets, layer_index, prefix_cache_supported
from dpfed.methods import Method, method_class
from dpfed.model import SequenceClassifier, load_base, resolve_model_path, select_targets
from dpfed.privacy import DPSGDParams, make_generator, new_seed
from dpfed.secure_encoding import SecureEncoding, choose_scale, rounded_sensitivity
from dpfed.seeds import RunStream, SplitStream, child_seed

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


class AuditPlan(Protocol):
    """What an audited run needs from the ``attacks`` package (``attacks.plan.CanaryAudit`` implements it)."""

    def holdout_size(self, n_records: int) -> int: ...

    def plant(self, splits: Splits, *, label_names: tuple[str, ...], tokenizer: Any, split_seed: int) -> tuple[Splits, Any]: ...

    def attack_records(self, splits: Splits, *, heldout: Any, split_seed: int, canaries: Any) -> Any: ...

    def gradient_canaries(self, shapes: dict[str, int], *, split_seed: int) -> tuple[Any, tuple]: ...

    def canary_clients(self, state: dict[str, torch.Tensor], *, split_seed: int) -> Any: ...

    def canary_state(self, global_state: dict[str, torch.Tensor], clients: Any, k: int) -> dict[str, torch.Tensor]: ...

    def save(self, run_dir: Path, *, canaries: Any, attack_records: Any, canary_clients: Any) -> None: ...


def _noop(kind: str, info: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Job:
    """Everything a run needs, built once by :func:`prepare`; never mutated (``dataclasses.replace`` for a variant)."""

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
    init_info: dict[str, Any] = field(default_factory=dict)
    setup_seconds: float = 0.0
    split_seed: int | None = None  # recorded in run.json (never the noise seed when it came from OS entropy)
    client_noise_multiplier: float | None = None  # client-level σ_c (privacy.unit client|both)
    canaries: Any = None  # the audit's canaries (from the AuditPlan) when the run is audited
    attack_records: dict | None = None  # members / held-out non-members for the membership attacks
    method: Method | None = None  # one of dpfed.methods.METHODS, built by prepare
    noise_enabled: bool = True  # False only for compare's noise-amplification twin (no guarantee)
    fixed_records: tuple = ()  # per client: the included white-box (gradient) canaries, FixedGradientRecords
    audit: Any = None  # the AuditPlan of an audited run (canary clients, saving the canaries)
    secure: SecureEncoding | None = None  # privacy.aggregation secure: the public integer encoding, μ, bits

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


def prepare(cfg: RunConfig, *, progress: Progress = _noop, split_seed: int | None = None,
            data_from: Job | None = None, audit: AuditPlan | None = None, noise_enabled: bool = True) -> Job:
    """Validate the whole configuration against data and model and build the job. Writes nothing.

    ``split_seed`` fixes the data split (resume); by default it derives from a user seed or is
    drawn from OS entropy independently of the noise seed, so recording it reveals no noise.
    ``data_from`` reuses another job's split, tokenised shards and frozen-prefix caches (``dpfed
    compare``: same data and model, another method); it must have the same split seed and the
    same data and model settings, and no canaries. ``audit``: the canary plan of an audited run
    (needed when the config asks for canaries, canary clients or held-out attack records).
    ``noise_enabled`` False builds the noise-free twin of ``dpfed compare`` (it claims nothing).
    """
    if (cfg.data.canaries or cfg.data.canary_clients or cfg.data.audit_holdout) and audit is None:
        raise ConfigError("data.canaries, data.canary_clients and data.audit_holdout need an audit plan: run "
                          "`dpfed train`, or pass audit=attacks.plan.CanaryAudit(cfg) to prepare()")
    t0 = time.time()
    seed_is_user = cfg.seed is not None
    seed = cfg.seed if seed_is_user else new_seed()
    if split_seed is None:
        split_seed = child_seed(seed, RunStream.SPLIT) if seed_is_user else new_seed()
    device = resolve_device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    task = cfg.model.task
    if data_from is not None:
        _check_reusable(cfg, data_from, split_seed)
    progress("setup", {"stage": "data"})
    data_notes: list[str] = []  # dropped records, declared public data: the CLI prints them
    records = _load_records(cfg, task=task, notes=data_notes) if data_from is None else None
    public_file = (_load_records(cfg, task=task, source=cfg.data.public_source, notes=data_notes)
                   if data_from is None and cfg.data.public_source else None)
    heldout = None
    n_holdout = 0 if data_from is not None or audit is None else audit.holdout_size(len(records))
    if n_holdout:  # non-members for the membership attacks, set aside before anything else
        perm = np.random.default_rng(child_seed(split_seed, SplitStream.HOLDOUT)).permutation(len(records))
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
    if data_from is not None:
        tokenizer = data_from.tokenizer
    else:  # an instruct model may be a GGUF file (dpfed.instruct); its tokenizer must render chat templates
        tokenizer = load_chat_tokenizer(cfg.model.name, path) if task == "instruct" else load_tokenizer(path)
    canaries = attack_records = None
    if cfg.data.canaries and cfg.data.canary_kind == "random-words":
        # the audit's canaries go through exactly the same sampling, clipping and noise as real records
        splits, canaries = audit.plant(splits, label_names=label_names, tokenizer=tokenizer, split_seed=split_seed)
    if heldout is not None:  # None for gradient canaries: they have no text
        attack_records = audit.attack_records(splits, heldout=heldout, split_seed=split_seed, canaries=canaries)
    num_labels = len(label_names)
    model = load_base(cfg.model.name, task=task, num_labels=max(num_labels, 2))
    if isinstance(model, SequenceClassifier) and label_names:  # the label <-> head index mapping, for the export
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model_type = getattr(model.config, "model_type", "")
    targets = cfg.model.target_modules or default_targets(model_type)
    names = select_targets(model, tuple(targets), cfg.model.adapt_layers)
    method_cls = method_class(cfg.train.method)
    adapters = method_cls.inject(model, names, rank=cfg.model.rank, alpha=cfg.model.lora_alpha,
                                 generator=make_generator(child_seed(seed, RunStream.INIT, 2)))
    model.to(device)
    fixed_records: tuple = ()
    if cfg.data.canaries and cfg.data.canary_kind == "gradient":
        # white-box canaries: distinct coordinates of the trainable parameters, bits from the split seed
        canaries, fixed_records = audit.gradient_canaries(
            {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}, split_seed=split_seed)
    ml = cfg.model.max_length
    if data_from is None:
        encode = encoder(cfg, tokenizer, model)
        shards = [encode(c) for c in splits.clients]
        n_eval = len(splits.test) if cfg.train.eval_examples is None else min(cfg.train.eval_examples, len(splits.test))
        test = encode(splits.test.subset(range(n_eval)))  # the test split is a random draw: its first records are too
    else:
        shards, test = data_from.shards, data_from.test
    sizes = _population_sizes(shards, fixed_records)
    n_min = min(sizes)
    if cfg.train.batch_size > n_min:
        raise ConfigError(f"batch_size must be <= the smallest client shard ({n_min} records), got {cfg.train.batch_size}")
    sigma = None
    secure = None
    if cfg.privacy.record_level:
        if cfg.privacy.delta >= 1.0 / n_min:
            raise ConfigError(f"delta must be < 1/n_min = {1.0 / n_min:.3g} (smallest client holds {n_min} records), got {cfg.privacy.delta:g}")
        if cfg.privacy.aggregation == "secure":
            dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
            secure = calibrate_secure(cfg, sizes, dim=dim, rotation_seed=child_seed(seed, RunStream.INIT, 3))
            sigma = secure_noise_multiplier(secure)
        else:
            sigma = cfg.privacy.noise_multiplier or calibrate(cfg, sizes)
    progress("setup", {"stage": "init", "strategy": cfg.init.strategy})
    gen = make_generator(child_seed(seed, RunStream.INIT))
    init_info: dict[str, Any] = {"public_records": len(splits.public)}
    init_head_random(model, generator=gen)
    lorasb_init = cfg.init.strategy if method_cls.spec.server_init else None  # LoRA baselines: PEFT's init (in inject)
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
    elif data_from is not None and task == "instruct":  # the shards carry the frozen prefix (identical in every job)
        init_info["prefix_cache_layers"] = float(test.prefix.start) if test.prefix is not None else 0.0
    elif cfg.model.prefix_cache and task == "instruct":
        progress("setup", {"stage": "prefix cache"})
        init_info.update(enable_prefix(model, names, shards, test, device, layer_index=layer_index,
                                       dtype=torch.bfloat16 if cfg.model.prefix_dtype == "bfloat16" else None))
    elif cfg.model.prefix_cache and isinstance(model, SequenceClassifier):
        progress("setup", {"stage": "prefix cache"})
        init_info.update(enable_prefix_cache(model, names, shards + [test], device))
    client_sigma = client_noise_multiplier(cfg) if cfg.privacy.client_level else None
    weighting = "uniform" if cfg.privacy.client_level else cfg.train.weighting
    method = method_cls.build(model, adapters, weighting=weighting, seed=seed)
    return Job(cfg, model, adapters, tokenizer, splits, test, shards, device, autocast_dtype, seed, seed_is_user,
               sigma, init_info, time.time() - t0, split_seed, client_sigma, canaries, attack_records, method,
               noise_enabled=noise_enabled, fixed_records=fixed_records, audit=audit, secure=secure)


def _load_records(cfg: RunConfig, *, task: str, source: str | None = None, notes: list[str]) -> Records:
    """The records of ``source`` (default ``data.source``): prompt/response pairs for instruct, texts (and labels) else."""
    if task == "instruct":
        return load_prompt_response(cfg.data, source=source, notes=notes)
    return load_records(cfg.data, task=task, source=source, notes=notes)


def load_task_records(cfg: RunConfig, *, source: str | None = None) -> Records:
    """The records of ``source`` (default ``data.source``) for ``cfg.model.task`` (a Flower site reads its own so)."""
    return _load_records(cfg, task=cfg.model.task, source=source, notes=[])


def site_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer training uses for ``cfg.model.name`` (an instruct model's renders its chat template)."""
    path = resolve_model_path(cfg.model.name)
    return load_chat_tokenizer(cfg.model.name, path) if cfg.model.task == "instruct" else load_tokenizer(path)


def encoder(cfg: RunConfig, tokenizer: Any, model: nn.Module) -> Callable[[Records], TokenizedShard | InstructShard]:
    """How records become a shard: prompt + response tokens with the response mask (instruct), or plain tokens."""
    ml = cfg.model.max_length
    if cfg.model.task == "instruct":
        return lambda r: tokenize_instruct(r, tokenizer, max_length=ml, chat_template=cfg.model.chat_template,
                                           system_prompt=cfg.data.system_prompt, model_config=model.config,
                                           max_new_tokens=cfg.model.max_new_tokens)
    return lambda r: tokenize(r, tokenizer, max_length=ml)


def _check_reusable(cfg: RunConfig, other: Job, split_seed: int) -> None:
    same = (cfg.data == other.cfg.data and cfg.model.name == other.cfg.model.name
            and cfg.model.max_length == other.cfg.model.max_length and cfg.model.adapt_layers == other.cfg.model.adapt_layers
            and cfg.model.target_modules == other.cfg.model.target_modules and cfg.model.prefix_cache == other.cfg.model.prefix_cache
            and cfg.device == other.cfg.device and split_seed == other.split_seed and not cfg.data.canaries)
    if not same:
        raise ValueError("data_from must share data, model, device settings and split seed, and have no canaries")


def enable_prefix_cache(model: SequenceClassifier, names: list[str], shards: list[TokenizedShard],
                         device: torch.device) -> dict[str, float]:
    """Cache hidden states below the lowest adapted layer when the split forward is exact."""
    start = min((layer_index(n) for n in names if layer_index(n) is not None), default=0)
    if start == 0 or not prefix_cache_supported(getattr(model.config, "model_type", "")):
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


def site_sizes(cfg: RunConfig) -> list[int]:
    """The sites' record counts for ``cfg`` as :func:`prepare` splits them, without loading the model (``dpfed plan``).

    The split seed derives from the config's seed as in :func:`prepare`; without one, only an
    ``iid`` partition has sizes that do not depend on the split (they are counts), so others are
    refused. Audited runs (canaries, held-out records) change the populations: refused.
    """
    d = cfg.data
    if d.canaries or d.canary_clients or d.audit_holdout:
        raise ConfigError("the config must not plant canaries or hold out attack records to plan from it (they change "
                          f"each site's population), got canaries={d.canaries}, canary_clients={d.canary_clients}, "
                          f"audit_holdout={d.audit_holdout}")
    if cfg.seed is None and d.partition != "iid":
        raise ConfigError(f"seed must be set to plan a '{d.partition}' partition from the config (its site sizes "
                          f"depend on the split), got none")
    seed = cfg.seed if cfg.seed is not None else 0  # iid: the sizes are counts, the same for every seed
    notes: list[str] = []
    records = _load_records(cfg, task=cfg.model.task, notes=notes)
    public = _load_records(cfg, task=cfg.model.task, source=d.public_source, notes=notes) if d.public_source else None
    splits = split_and_partition(records, d, seed=child_seed(seed, RunStream.SPLIT), public=public)
    return [len(c) for c in splits.clients]


def site_plans(cfg: RunConfig, sizes: list[int]) -> list:
    """Each site's planned record-level releases (``accounting.planning.SitePlan``) for the run ``cfg``.

    ``rounds × local_steps`` Poisson-Gaussian steps at q = batch / n; with ``init: dp`` the
    site's DP-initialisation release at q0 = dp_batch / n is a fixed event of its plan.
    """
    from accounting.events import PoissonGaussianEvent
    from accounting.planning import SitePlan

    steps = cfg.train.rounds * cfg.train.local_steps
    plans = []
    for n in sizes:
        fixed = ((PoissonGaussianEvent(noise_multiplier=cfg.init.dp_noise_multiplier,
                                       sample_rate=sample_rate(cfg.init.dp_batch_size, n), count=1),)
                 if cfg.init.strategy == "dp" else ())
        plans.append(SitePlan(sample_rate=sample_rate(cfg.train.batch_size, n), steps=steps, fixed_events=fixed))
    return plans


def calibrate(cfg: RunConfig, sizes: list[int]) -> float:
    """σ such that every site ends at or below ε after all planned rounds: ``accounting.planning.calibrate_sites``,
    the calibration ``dpfed plan`` runs. With ``init: dp`` each site's initialisation event is part of its plan.
    """
    from accounting.errors import AccountingInputError
    from accounting.planning import calibrate_sites

    try:
        return calibrate_sites(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, sites=site_plans(cfg, sizes))
    except AccountingInputError:
        if cfg.init.strategy != "dp":
            raise
        raise ConfigError(f"init.dp_noise_multiplier must leave budget for training: the DP initialisation alone "
                          f"spends the whole epsilon {cfg.privacy.epsilon:g} for a client of {min(sizes)} records, "
                          f"got {cfg.init.dp_noise_multiplier:g}") from None


def calibrate_secure(cfg: RunConfig, sizes: list[int], *, dim: int, rotation_seed: int) -> SecureEncoding:
    """The public encoding of ``privacy.aggregation: secure``: scale, Skellam variance μ and modulus bits.

    The scale is the smallest power of two whose rounding inflates the L2 sensitivity by at most
    1 %; μ_total (the variance of the summed noise, calibrated for ``min_sites`` surviving
    shares) is the smallest one with which ``train.rounds`` Poisson-subsampled Skellam releases
    at the largest site rate ``q = b / n_min`` end at or below ε (``accounting.skellam.calibrate_mu``:
    RDP, an upper bound), or ``(σ · Δ₂)²`` when ``privacy.noise_multiplier`` σ is given; the bits
    are the fewest with which a sum of every record of the ``sites per round`` largest sites plus
    the noise of all of them never wraps (``SecureEncoding.plan``, refused above 53).
    """
    from accounting.skellam import calibrate_mu

    clip, per_round = cfg.privacy.clip, cfg.sites_per_round()
    scale = choose_scale(clip=clip, dim=dim)
    sens = rounded_sensitivity(dim=dim, clip=clip, scale=scale)
    if cfg.privacy.noise_multiplier is not None:
        mu_total = (cfg.privacy.noise_multiplier * sens.l2) ** 2
    else:
        q_max = max(sample_rate(cfg.train.batch_size, n) for n in sizes)
        mu_total = calibrate_mu(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, sample_rate=q_max,
                                steps=cfg.train.rounds, l2_sensitivity=sens.l2, l1_sensitivity=sens.l1)
    return SecureEncoding.plan(dim=dim, clip=clip, scale=scale, rotation_seed=rotation_seed, mu_total=mu_total,
                               min_sites=cfg.min_sites(), max_sites=per_round,
                               max_records=sum(sorted(sizes, reverse=True)[:per_round]))


def secure_noise_multiplier(encoding: SecureEncoding) -> float:
    """The Gaussian-equivalent σ of the summed noise: sqrt(μ_total) / Δ₂ (both in integer units)."""
    return math.sqrt(encoding.mu_total) / encoding.sensitivity.l2


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
                              sample_generator=make_generator(child_seed(seed, RunStream.SAMPLE, i)),
                              noise_generator=make_generator(child_seed(seed, RunStream.NOISE, i), job.device) if job.dp else None,
                              ledger=ledger, budget=budget, device=job.device, autocast_dtype=job.autocast_dtype,
                              noise_enabled=job.noise_enabled, fixed=fixed[i], secure=job.secure,
                              diagnostics=None if diagnostics_dir is None else diagnostics_dir / f"client-{i:03d}.jsonl"))
    return clients
