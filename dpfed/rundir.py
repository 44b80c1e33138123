"""The run directory: its files, atomic writes, checkpoints, metrics lines and the summary.

Everything here writes or reads one run directory; nothing trains. Files that an operator may
share (``metrics.jsonl``, ``summary.json``, ``checkpoint.json``) are assembled through
:func:`dpfed.release.release`. Writes are atomic (temporary file, fsync, rename, fsync of the
folder) so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from accounting.ledger import fsync_dir
from dpfed.errors import ConfigError, Interrupted
from dpfed.method_specs import method_spec
from dpfed.payload import FRAMING_BYTES
from dpfed.release import release, unit_of

if TYPE_CHECKING:
    from dpfed.setup import Job


RUN_JSON = "run.json"
LABELS_JSON = "labels.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
LEDGER = "ledger.jsonl"
SERVER_LEDGER = "server_ledger.jsonl"
BUDGET_JSON = "budget.json"
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
INITIAL_STATE = "initial_state.safetensors"


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


def interrupted(run_dir: Path, *, created: bool) -> Interrupted:
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over ``path``, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, fsync, rename)."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


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
    atomic_write(run_dir / CHECKPOINT, save(tensors, metadata={"dpfed": json.dumps(meta)}))
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


def ledger_head(ledger) -> list:
    seq, digest = ledger.head
    return [seq, digest]


def checkpoint_meta(run_dir: Path, ledger, server_ledger) -> dict[str, Any]:
    """What a checkpoint records besides the states: the ledgers' head hashes and the config's hash."""
    return {"ledger_head": ledger_head(ledger), "server_ledger_head": ledger_head(server_ledger) if server_ledger else None,
            "config_sha256": sha256_hex((run_dir / "config.yaml").read_bytes()), "ledger_keyed": ledger.keyed}


def open_ledger_for_resume(path: Path, expected_head: list | None, fallback_events: Callable[[], list[tuple[str, int, Any]]], *,
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


def truncate_metrics(path: Path, *, last_round: int) -> None:
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
    atomic_write(path, "".join(x + "\n" for x in keep).encode())


def _accountant_label(eps_clients: dict[str, Any]) -> str:
    """Which accountant the reported ε came from: PRV, or RDP for the clients where the PRV library failed."""
    fell_back = sorted(k for k, e in eps_clients.items() if getattr(e, "source", "prv") == "rdp")
    if not fell_back:
        return "prv (upper bound)"
    if len(fell_back) == len(eps_clients):
        return "rdp (upper bound; the PRV accountant failed for every client)"
    return f"prv (upper bound); rdp (upper bound) for {', '.join(fell_back)}, where the PRV accountant failed"


def build_summary(job: Job, *, eps_clients: dict[str, Any], sample_rates: dict[str, float], client_sizes: dict[str, int],
                  clients_per_round: int, rounds_done: int, stop_reason: str, resumed: dict[str, Any] | None,
                  eval0: dict[str, float], last_eval: dict[str, float], bytes_up: list[int], bytes_down: list[int],
                  agg_errors: list[float], trainable: int, t_start: float,
                  client_level: dict[str, Any] | None = None, init_info: dict[str, Any] | None = None,
                  secure: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json`` of a finished run (the in-process runner and the Flower server write the same keys).

    ``secure``: with ``privacy.aggregation: secure``, the encoding and the colluding-server ε
    (:func:`dpfed.session.secure_summary`); it adds the keys ``secure_aggregation`` and
    ``epsilon_colluding_server``. Runs with local aggregation write exactly the keys they did before.
    """
    return release("summary", _summary_fields(job, eps_clients=eps_clients, sample_rates=sample_rates,
                                              client_sizes=client_sizes, clients_per_round=clients_per_round,
                                              rounds_done=rounds_done, stop_reason=stop_reason, resumed=resumed,
                                              eval0=eval0, last_eval=last_eval, bytes_up=bytes_up,
                                              bytes_down=bytes_down, agg_errors=agg_errors, trainable=trainable,
                                              t_start=t_start, client_level=client_level,
                                              init_info=job.init_info if init_info is None else init_info,
                                              secure=secure),
                   unit=unit_of(job.cfg))


def _summary_fields(job: Job, *, eps_clients, sample_rates, client_sizes, clients_per_round, rounds_done, stop_reason,
                    resumed, eval0, last_eval, bytes_up, bytes_down, agg_errors, trainable, t_start,
                    client_level, init_info, secure=None) -> dict[str, Any]:
    cfg = job.cfg
    record_label = "record-level DP per client (local DP-SGD)"
    claims = cfg.privacy.enabled and job.noise_enabled
    privacy = ("none (--no-dp): no privacy guarantee" if not cfg.privacy.enabled else
               "none (noise-free twin of dpfed compare): no privacy guarantee" if not job.noise_enabled else
               {"record": record_label, "client": "client-level DP only (DP-FedAvg, trusted server)",
                "both": record_label + " and, separately, client-level DP (DP-FedAvg, trusted server)"}[cfg.privacy.unit])
    fields = {
        "method": cfg.train.method,
        "privacy": privacy,
        "privacy_unit": cfg.privacy.unit if claims else None,
        "epsilon_target": cfg.privacy.epsilon if job.dp and claims else None,
        "delta": cfg.privacy.delta if job.dp and claims else None,
        "epsilon_spent": max(e.upper for e in eps_clients.values()) if eps_clients else None,
        "epsilon_per_client": {k: e.upper for k, e in eps_clients.items()},
        "accountant": _accountant_label(eps_clients) if job.dp and claims else None,
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
        "init": cfg.init.strategy if method_spec(cfg.train.method).server_init else "peft-default (A Kaiming-uniform, B = 0)",
        "noise": "enabled" if job.noise_enabled else "DISABLED (noise-amplification twin: no privacy guarantee)",
        "init_info": init_info,
        "initial_eval": eval0,
        "accuracy_before": eval0.get("accuracy"),  # zero-shot for an instruct run: the same held-out prompts
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
    if job.secure is not None:
        if claims:
            fields["privacy"] = ("record-level DP per client against everyone who sees only the secure sum "
                                 "(distributed DP: Skellam shares, secure aggregation)")
            fields["accountant"] = "rdp (Poisson-subsampled Skellam, upper bound)"
        fields.update(secure or {})
    return fields


def append_metrics(path: Path, line: dict[str, Any]) -> None:
    """Append one released metrics line and fsync it (the line is written before the round's checkpoint)."""
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_budget(run_dir: Path, job: Job) -> None:
    """``budget.json``: the (ε, δ) the run is held to; none for runs that claim nothing (no DP, noise-free twin)."""
    if not (job.dp or job.client_dp) or not job.noise_enabled:
        return
    cfg = job.cfg
    info: dict[str, Any] = {"accountant": "prv"}  # secure aggregation: prv's epsilon dispatches Skellam events to RDP
    if job.dp:
        info.update(epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, privacy_unit="record")
    if job.client_dp:
        info["client_level"] = {"epsilon": cfg.privacy.client_epsilon, "delta": cfg.privacy.client_delta_value}
    write_json(run_dir / BUDGET_JSON, info)
