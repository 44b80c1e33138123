"""One site of a Flower run: its records, its copy of the model, and the :class:`~dpfed.client.Client`.

The site builds what :func:`dpfed.runner.prepare` builds for one client, from the same
functions, but only for its own data: the demo partition (``partition-id``: the run's split,
from the split seed the server sends) or its own file (``data-path``). The frozen factors
B, A and the global state come from the server; the data, the ledger, the budget and the
noise generator stay with the site. Nothing here imports ``flwr``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpfed.client import Budget, Client, LocalTraining
from dpfed.config import RunConfig
from dpfed.data import Records, split_and_partition
from dpfed.errors import ConfigError, DataError
from dpfed.flower.settings import SiteSettings
from dpfed.privacy import DPSGDParams, new_seed
from dpfed.seeds import SplitStream, child_seed

log = logging.getLogger(__name__)


def site_config(cfg: RunConfig, settings: SiteSettings) -> RunConfig:
    """The server's run config with what the site decides for itself (model path, device, budget)."""
    from dpfed import config as cfgmod

    return cfgmod.override(cfg, **{"model.name": settings.model, "device": settings.device,
                                   "privacy.epsilon": settings.epsilon if cfg.privacy.enabled else None,
                                   "privacy.delta": settings.delta if cfg.privacy.enabled else None})


def site_records(cfg: RunConfig, settings: SiteSettings, *, split_seed: int, label_names: tuple[str, ...],
                 audit: Any = None) -> Records:
    """The site's training records, labels indexed like the server's ``label_names``.

    ``audit`` (an audited run's plan): the records the server set aside as attack non-members
    before the split are removed here the same way, so that the partition is the server's.
    """
    if settings.partition_id is not None:
        if settings.num_partitions != cfg.data.num_clients:
            raise ConfigError(f"num-partitions must equal the run's data.num_clients = {cfg.data.num_clients}, "
                              f"got {settings.num_partitions}")
        records = _task_records(cfg)
        holdout = 0 if audit is None else audit.holdout_size(len(records))
        if holdout:  # the same set-aside as dpfed.setup.prepare
            perm = np.random.default_rng(child_seed(split_seed, SplitStream.HOLDOUT)).permutation(len(records))
            records = records.subset(np.sort(perm[holdout:]))
        shard = split_and_partition(records, cfg.data, seed=split_seed).clients[settings.partition_id]
    else:
        shard = _task_records(cfg, source=settings.data_path)
    if getattr(shard, "labels", None) is None:  # causal-LM texts, or instruct prompt/response pairs
        return shard
    if shard.label_names == label_names:
        return shard
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(shard.label_names) - set(index))
    if unknown:
        raise DataError(f"label_column values must be among the run's labels {list(label_names)}, "
                        f"got {unknown[:3]} in {settings.data_path or 'the partition'}")
    labels = tuple(index[shard.label_names[y]] for y in shard.labels)
    return Records(shard.texts, labels, label_names)


def _task_records(cfg: RunConfig, *, source: str | None = None) -> Records:
    """The records of ``source`` (default ``data.source``) as training reads them (``dpfed.setup``): prompt/response
    pairs for an instruct run, texts (and labels) otherwise."""
    from dpfed.setup import load_task_records

    return load_task_records(cfg, source=source)


@dataclass
class Site:
    """The site's model (with the server's frozen factors installed), method and client."""

    model: nn.Module
    method: Any  # dpfed.methods.FedSBMethod
    client: Client
    cfg: RunConfig


def build_site(cfg: RunConfig, settings: SiteSettings, *, split_seed: int, label_names: tuple[str, ...],
               frozen: dict[str, torch.Tensor], noise_multiplier: float | None, round: int,  # noqa: A002
               ledger, audit: Any = None, secure: Any = None) -> Site:
    """Build the site's client for ``round`` (per-round generators, as in :class:`dpfed.session.InProcessSites`).

    ``cfg`` is the server's config; :func:`site_config` applies the site's own choices.
    Sampling and noise generators derive from the site's seed like the in-process runner's
    from the run seed: ``seed → (3, index, round)`` and ``(4, index, round)``. ``secure``: the
    server's public :class:`~dpfed.secure_encoding.SecureEncoding` in a secure-aggregation round.
    """
    from dpfed.families import default_targets
    from dpfed.methods import method_class
    from dpfed.model import SequenceClassifier, load_base, select_targets
    from dpfed.privacy import make_generator
    from dpfed.seeds import site_generators
    from dpfed.setup import enable_prefix_cache, encoder, resolve_device, site_tokenizer

    cfg = site_config(cfg, settings)
    device = resolve_device(cfg.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    records = site_records(cfg, settings, split_seed=split_seed, label_names=label_names, audit=audit)
    if len(records) == 0:
        raise DataError(f"site {settings.site_id} must hold at least one record, got 0")
    model = load_base(cfg.model.name, task=cfg.model.task, num_labels=max(len(label_names), 2))
    shard = encoder(cfg, site_tokenizer(cfg), model)(records)  # as dpfed.setup tokenises: instruct masks the prompt
    targets = cfg.model.target_modules or default_targets(getattr(model.config, "model_type", ""))
    names = select_targets(model, tuple(targets), cfg.model.adapt_layers)
    method_cls = method_class(cfg.train.method)
    # the initial factors do not matter here: the global state and the frozen tensors the server sends replace them
    adapters = method_cls.inject(model, names, rank=cfg.model.rank, alpha=cfg.model.lora_alpha,
                                 generator=make_generator(0))
    model.to(device)
    method = method_cls.build(model, adapters, weighting=cfg.train.weighting, seed=0)
    _install_frozen(method, frozen)
    if cfg.model.prefix_cache and isinstance(model, SequenceClassifier):
        enable_prefix_cache(model, names, [shard], device)
    elif cfg.model.prefix_cache and cfg.model.task == "instruct":  # the same frozen-prefix split as in process
        from dpfed.families import layer_index
        from dpfed.instruct import enable_prefix

        enable_prefix(model, names, [shard], shard, device, layer_index=layer_index,
                      dtype=torch.bfloat16 if cfg.model.prefix_dtype == "bfloat16" else None)
    fixed = None
    if audit is not None and cfg.data.canaries:  # this site's included gradient canaries (the server's draw)
        _, per_site = audit.gradient_canaries({n: p.numel() for n, p in model.named_parameters() if p.requires_grad},
                                              split_seed=split_seed)
        fixed = per_site[settings.index]
    dp = None
    budget = None
    n = len(shard) + (len(fixed) if fixed is not None else 0)  # the population q = b / n counts the canaries
    if cfg.privacy.record_level:
        if cfg.privacy.delta >= 1.0 / n:
            raise ConfigError(f"delta must be < 1/n = {1.0 / n:.3g} (site {settings.site_id} holds "
                              f"{n} records), got {cfg.privacy.delta:g}")
        if cfg.train.batch_size > n:
            raise ConfigError(f"batch_size must be <= the site's {n} records, got {cfg.train.batch_size}")
        sigma = settings.noise_multiplier if settings.noise_multiplier is not None else noise_multiplier
        if sigma is None:
            raise ConfigError("noise_multiplier must come from the server or the node config, got neither")
        dp = DPSGDParams(noise_multiplier=sigma, clip=cfg.privacy.clip, expected_batch_size=cfg.train.batch_size)
        budget = Budget(cfg.privacy.epsilon, cfg.privacy.delta)
    elif settings.epsilon is not None:
        raise ConfigError(f"privacy.enabled must be true for site {settings.site_id}, which sets its own epsilon "
                          f"{settings.epsilon:g}; the server asked for a run without record-level DP")
    seed = settings.seed if settings.seed is not None else new_seed()
    training = LocalTraining(local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                             optimizer=cfg.train.optimizer, momentum=cfg.train.momentum, task=cfg.model.task)
    sample_gen, noise_gen = site_generators(seed, settings.index, round, history=len(ledger.events(settings.site_id)),
                                            device=device)
    client = Client(client_id=settings.site_id, shard=shard, training=training, dp=dp,
                    sample_generator=sample_gen, noise_generator=noise_gen if dp else None,
                    ledger=ledger, budget=budget, device=device, autocast_dtype=autocast_dtype,
                    diagnostics=site_local_path(settings.ledger), fixed=fixed, secure=secure)
    return Site(model, method, client, cfg)


def site_local_path(ledger: Path) -> Path:
    """The site's own diagnostics file, beside its ledger (mode 0600; never sent; outside the guarantee)."""
    return ledger.with_name(ledger.stem + ".site-local.jsonl")


def _install_frozen(method, frozen: dict[str, torch.Tensor]) -> None:
    """Install the server's frozen tensors (Fed-SB's B and A, FFA-LoRA's A, the folded W0) after checking them."""
    expected = {k: tuple(v.shape) for k, v in method.frozen_state().items()}
    if set(frozen) != set(expected):
        missing, extra = sorted(set(expected) - set(frozen))[:3], sorted(set(frozen) - set(expected))[:3]
        raise ConfigError(f"frozen factors must match this site's adapters: missing {missing}, unexpected {extra}")
    for k, shape in expected.items():
        if tuple(frozen[k].shape) != shape:
            raise ConfigError(f"frozen factor {k} must have shape {shape}, got {tuple(frozen[k].shape)}")
        if not torch.isfinite(frozen[k]).all():
            raise ConfigError(f"frozen factor {k} must be finite, got NaN or inf")
    method.load_frozen_state(frozen)
