"""``dpfed train`` in process: :func:`run` a prepared job, or :func:`resume` one from its run directory.

The pieces live in their own modules: :mod:`dpfed.setup` (configuration → frozen job),
:mod:`dpfed.rundir` (files, checkpoints, summary), :mod:`dpfed.session` (the round loop over a
transport), :mod:`dpfed.seeds` (derived seeds). The names below are re-exported for callers
of the earlier single-module runner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from accounting.events import PoissonGaussianEvent
from accounting.ledger import Ledger
from accounting.prv import epsilon as prv_epsilon
from accounting.sampling import sample_rate
from dpfed import config as config_mod
from dpfed.adapters.lorasb import load_trainable_state, trainable_state
from dpfed.config import RunConfig
from dpfed.errors import ConfigError, RunComplete
from dpfed.evaluation import evaluate
from dpfed.jsonio import read_json_object
from dpfed.privacy import new_seed
from dpfed.release import SITE_LOCAL_DIR
from dpfed.rundir import (CHECKPOINT, CHECKPOINT_JSON, CLAIM, LABELS_JSON, LEDGER, METRICS, RUN_JSON, SERVER_LEDGER,
                          SUMMARY, build_summary, checkpoint_meta, claim_run_dir, interrupted, load_checkpoint,
                          open_ledger_for_resume, release_claim, save_checkpoint, save_state, sha256_hex,
                          truncate_metrics, write_json)
from dpfed.rundir_check import verify_run_ledgers
from dpfed.seeds import child_seed, site_generators
from dpfed.session import CLIENT_TRUST, SERVER_ID, InProcessSites, server_event, start, train_rounds
from dpfed.setup import (AuditPlan, Job, Progress, calibrate, client_noise_multiplier, dp_init_params,
                         enable_prefix_cache, make_clients, prepare, resolve_device)

__all__ = ["run", "resume", "prepare", "Job", "make_clients", "calibrate", "evaluate", "load_checkpoint",
           "claim_run_dir", "release_claim", "child_seed", "site_generators", "build_summary", "save_checkpoint",
           "checkpoint_meta", "save_state", "sha256_hex", "write_json", "enable_prefix_cache", "resolve_device",
           "client_noise_multiplier", "dp_init_params", "CHECKPOINT", "CHECKPOINT_JSON", "CLAIM", "LABELS_JSON", "LEDGER",
           "RUN_JSON", "SERVER_LEDGER", "SERVER_ID", "CLIENT_TRUST"]

log = logging.getLogger(__name__)


def _noop(kind: str, info: dict[str, Any]) -> None:
    return None


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
    created = claim_run_dir(run_dir) if claimed is None else claimed
    try:
        if not job.noise_enabled:
            with tempfile.TemporaryDirectory(prefix="dpfed-twin-ledger-") as scratch:
                return _run(job, run_dir, ledger_dir=Path(scratch), progress=progress, ledger_key=None)
        return _run(job, run_dir, ledger_dir=run_dir, progress=progress, ledger_key=ledger_key)
    except KeyboardInterrupt:
        raise interrupted(run_dir, created=created) from None


def _run(job: Job, run_dir: Path, *, ledger_dir: Path, progress: Progress, ledger_key: bytes | None) -> dict[str, Any]:
    ledger = Ledger(ledger_dir / LEDGER, key=ledger_key)
    server_ledger = Ledger(ledger_dir / SERVER_LEDGER, key=ledger_key) if job.client_dp else None
    global_state, eval0, init_info = start(job, run_dir, ledger=ledger, server_ledger=server_ledger, progress=progress)
    sites = InProcessSites(job, ledger=ledger, seed=job.seed, diagnostics_dir=run_dir / SITE_LOCAL_DIR)
    return train_rounds(job, run_dir, transport=sites, ledger=ledger, server_ledger=server_ledger,
                        global_state=global_state, start_round=1, seed=job.seed, eval0=eval0, init_info=init_info,
                        progress=progress, resumed=None)


def resume(run_dir: Path, *, progress: Progress = _noop, device: str | None = None, ledger_key: bytes | None = None,
           audit: Callable[[RunConfig], AuditPlan | None] | None = None) -> dict[str, Any]:
    """Continue a run from its last checkpoint and its ledgers; return the new summary.

    Rounds the ledger holds beyond the checkpoint (a crash after a site appended its events but
    before the round's checkpoint) stay counted: the resumed run over-counts, never under-counts.
    Sampling and noise get fresh OS-entropy seeds unless the run was started with a user seed,
    in which case per-round seeds derive from it and the resumed run is reproducible. ``audit``
    builds the audit plan of an audited run from its configuration (``attacks.plan.audit_plan``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / RUN_JSON).is_file():
        raise ConfigError(f"--resume must name a run directory with config.yaml and {RUN_JSON}, got '{run_dir}'")
    if (run_dir / SUMMARY).is_file():  # written only when a run ends (all rounds, or a budget stop)
        raise RunComplete(run_dir, read_json_object(run_dir / SUMMARY, what="summary"))
    config_text = (run_dir / "config.yaml").read_bytes()
    info = json.loads((run_dir / RUN_JSON).read_text())
    meta, trainable, frozen = load_checkpoint(run_dir)
    digest = sha256_hex(config_text)
    if digest != info["config_sha256"] or digest != meta["config_sha256"]:
        raise ConfigError(f"{run_dir}/config.yaml changed since the run started (sha256 mismatch); refusing to resume")
    cfg = config_mod.from_dict(yaml.safe_load(config_text))
    if device is not None:
        cfg = config_mod.override(cfg, device=device)
    # rebuild data split and model; the adapter factors and state come from the checkpoint, so init is skipped
    cheap = config_mod.override(cfg, **{"init.strategy": "random", "init.head": "random",
                                        "privacy.noise_multiplier": info["noise_multiplier"],
                                        "privacy.client_noise_multiplier": info.get("client_noise_multiplier")})
    job = prepare(cheap, progress=progress, split_seed=int(info["split_seed"]),
                  audit=audit(cheap) if audit is not None else None)
    seed_is_user = info.get("seed") is not None  # an OS-entropy seed was never recorded: draw a new one
    job = dataclasses.replace(job, cfg=cfg, init_info=info.get("init_info", {}), seed_is_user=seed_is_user,
                              seed=int(info["seed"]) if seed_is_user else new_seed())
    job.method.load_frozen_state(frozen)
    load_trainable_state(job.model, trainable)
    first = int(meta["round"]) + 1

    def in_flight_record() -> list[tuple[str, int, Any]]:
        evs = [] if not job.dp else [PoissonGaussianEvent(noise_multiplier=job.noise_multiplier, sample_rate=sample_rate(
            cfg.train.batch_size, n), count=cfg.train.local_steps) for n in job.population_sizes()]
        return [(f"client-{i:03d}", first, ev) for i, ev in enumerate(evs)]

    def in_flight_server() -> list[tuple[str, int, Any]]:
        return [(SERVER_ID, first, server_event(job))]

    ledger = open_ledger_for_resume(run_dir / LEDGER, meta["ledger_head"], in_flight_record, key=ledger_key)
    server_ledger = (open_ledger_for_resume(run_dir / SERVER_LEDGER, meta.get("server_ledger_head"), in_flight_server,
                                            key=ledger_key) if job.client_dp else None)
    if ledger.keyed and not ledger.mac_verified:
        raise ConfigError(f"--ledger-key must be given to resume {run_dir}: its ledger is keyed (HMAC), got no key")
    verify_run_ledgers(run_dir, key=ledger_key)  # a torn line is repaired above; the rest must agree with the checkpoint
    if job.dp:  # refuse at once if the ledger already holds more than the budget
        for i in range(len(job.shards)):
            cid = f"client-{i:03d}"
            eps = prv_epsilon(ledger.events(cid), delta=cfg.privacy.delta).upper
            if eps > cfg.privacy.epsilon:
                raise ConfigError(f"client {cid} has already spent epsilon {eps:.4f} > budget {cfg.privacy.epsilon:g} "
                                  f"(over by {eps - cfg.privacy.epsilon:.4f}); refusing to resume")
    truncate_metrics(run_dir / METRICS, last_round=first - 1)
    eval0 = info.get("initial_eval") or {}
    log.info("resuming %s at round %d (ledger holds %d records)", run_dir, first, len(ledger))
    sites = InProcessSites(job, ledger=ledger, seed=job.seed, diagnostics_dir=run_dir / SITE_LOCAL_DIR)
    try:
        return train_rounds(job, run_dir, transport=sites, ledger=ledger, server_ledger=server_ledger,
                            global_state=trainable_state(job.model), start_round=first, seed=job.seed, eval0=eval0,
                            init_info=job.init_info, progress=progress,
                            resumed={"from_round": first - 1, "ledger_records": len(ledger)})
    except KeyboardInterrupt:
        raise interrupted(run_dir, created=False) from None
