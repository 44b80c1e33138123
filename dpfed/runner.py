"""``dpfed train`` in process: :func:`run` a prepared job, or :func:`resume` one from its run directory.

The pieces live in their own modules: :mod:`dpfed.setup` (configuration → frozen job),
:mod:`dpfed.rundir` (files, checkpoints, summary), :mod:`dpfed.session` (the round loop over a
transport), :mod:`dpfed.seeds` (derived seeds). The names below are re-exported for callers
of the earlier single-module runner.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


from accounting.ledger import Ledger
from dpfed.adapters.lorasb import trainable_state
from dpfed.config import RunConfig
from dpfed.evaluation import evaluate
from dpfed.release import SITE_LOCAL_DIR
from dpfed.rundir import (CHECKPOINT, CHECKPOINT_JSON, CLAIM, LABELS_JSON, LEDGER, RUN_JSON, SERVER_LEDGER,
                          build_summary, checkpoint_meta, claim_run_dir, interrupted, load_checkpoint,
                          release_claim, save_checkpoint, save_state, sha256_hex,
                          write_json)
from dpfed.seeds import child_seed, site_generators
from dpfed.session import CLIENT_TRUST, SERVER_ID, InProcessSites, reopen, start, train_rounds
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
    The checks and the rebuilt job are :func:`dpfed.session.reopen`'s, which the Flower server's
    resume uses too.
    """
    run_dir = Path(run_dir)
    again = reopen(run_dir, progress=progress, device=device, ledger_key=ledger_key, audit=audit)
    job, ledger = again.job, again.ledger
    log.info("resuming %s at round %d (ledger holds %d records)", run_dir, again.first, len(ledger))
    sites = InProcessSites(job, ledger=ledger, seed=job.seed, diagnostics_dir=run_dir / SITE_LOCAL_DIR)
    try:
        return train_rounds(job, run_dir, transport=sites, ledger=ledger, server_ledger=again.server_ledger,
                            global_state=trainable_state(job.model), start_round=again.first, seed=job.seed,
                            eval0=again.eval0, init_info=job.init_info, progress=progress,
                            resumed={"from_round": again.first - 1, "ledger_records": len(ledger)})
    except KeyboardInterrupt:
        raise interrupted(run_dir, created=False) from None
