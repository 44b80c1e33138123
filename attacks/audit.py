"""Audit one training run: rebuild its initial and final models, score canaries and records, bound epsilon.

Inputs, all in the run directory (besides the base model and its tokenizer, nothing else is read;
:func:`audit_run` writes nothing, :mod:`attacks.report` writes the reports):

* ``config.yaml``: the run's :class:`dpfed.config.RunConfig` (model, task, max_length, delta);
* ``initial_state.safetensors``: the global trainable state before training, keys as in
  ``model.named_parameters()`` of the adapted model (``<module>.R``, ``head.weight``, ``head.bias``);
* ``adapter/lorasb.safetensors``: the final ``<module>.B``, ``<module>.A``, ``<module>.R`` and head.
  B and A are frozen, so the same B, A serve the initial and the final model;
* ``adapter/lorasb_config.json`` (optional): ``scale`` of the adapter (default 1);
* ``summary.json``, ``budget.json`` and ``ledger.jsonl``: the claim (epsilon is re-derived from the
  ledger's events when the ledger is there). The ledgers are first checked against the checkpoint,
  ``run.json`` and ``summary.json`` (:func:`dpfed.rundir_check.verify_run_ledgers`); a directory
  without a ledger or any file the runner writes beside it (no checkpoint, no ``run.json``) is
  audited against ``summary.json``'s claim, and the report names that source;
* ``canaries.json`` (required) and ``attack_records.json`` (optional), from :mod:`attacks.canaries`.

Method:

* one-run audit (Steinke, Nasr & Jagielski, arXiv 2305.08846, Algorithm 1 and Theorem 3.1): each
  canary's score is, for gradient canaries, how far training moved its coordinate along it once the
  drift is taken out (:meth:`attacks.canaries.GradientCanarySet.scores`; white-box, no forward
  pass), and for random-word canaries its loss reduction, loss(initial) - loss(final); one score
  for all canaries of a run, set by their kind before training. The auditor guesses "in" for the
  ``k`` highest and "out" for the ``k`` lowest scores, ``k = max(1, floor(k_fraction * m))`` per side.
  ``k`` depends on ``m`` and ``k_fraction`` only and is fixed before any score is computed;
  ties at a boundary are abstained on. :func:`attacks.metrics.one_run_audit` turns ``r`` guesses with
  ``v`` correct into epsilon_LB at ``confidence``; the ceiling is the bound had all ``2k`` guesses
  been right;
* real-record attacks on ``attack_records.json``: loss attack (``-loss_final``) and reference attack
  (``loss_initial - loss_final``; the model before fine-tuning is the free reference): AUC with a
  bootstrap interval, TPR at 1% and 0.1% FPR with Clopper-Pearson intervals, ROC curves, and
  mu-GDP estimates (Dong, Roth & Su, arXiv 1905.02383), from the AUC and from the best ROC point;
* verdict: ``no-claim`` for runs without DP; ``violation`` when epsilon_LB > epsilon claimed, else
  ``consistent``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from accounting.errors import AccountingError
from attacks import metrics as mt
from attacks.canaries import (
    ATTACK_RECORDS_FILE,
    CANARIES_FILE,
    CanarySet,
    attack_records_as_records,
    load_attack_records,
    load_canaries,
)
from attacks.scores import loss_reduction, loss_score, per_record_loss, reference_score
from dpfed.config import RunConfig
from dpfed.jsonio import read_json_object
from dpfed.errors import ConfigError, DataError
from dpfed.rundir_check import VerifiedLedgers, verify_run_ledgers

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_K_FRACTION",
    "RunFiles",
    "load_run",
    "guesses_per_side",
    "build_model",
    "read_claim",
    "attack_metrics",
    "gdp_estimate",
    "audit_run",
]

AUDIT_FORMAT = "dpfed-audit/1"
DEFAULT_K_FRACTION = 0.1
LOW_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
BOOTSTRAP_SEED = 0  # the AUC interval is descriptive; a fixed seed makes the report reproducible
N_BOOT = 1000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PACKAGES = ("dpfed", "torch", "transformers", "numpy", "scipy", "safetensors", "prv-accountant", "matplotlib")

VERDICT_CONSISTENT, VERDICT_VIOLATION, VERDICT_NO_CLAIM = "consistent", "violation", "no-claim"


# --------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """Everything the audit reads from a run directory, validated."""

    run_dir: Path
    cfg: RunConfig
    summary: dict[str, Any]
    budget: dict[str, Any] | None
    initial_state: dict[str, torch.Tensor]
    adapter_state: dict[str, torch.Tensor]
    adapter_meta: dict[str, Any]
    canaries: CanarySet
    attack_records: dict[str, Any] | None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"{path}: not found; the audit needs the run's initial and final adapter states")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated / foreign files
        raise DataError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


def _load_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    return read_json_object(path, required=required)


def load_run(run_dir: str | Path) -> RunFiles:
    """Read and validate the files the audit needs; DataError naming the file otherwise."""
    from dpfed import config as config_mod

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"RUN_DIR must be a run directory, got {str(run_dir)!r} (not a directory)")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: not found; is {str(run_dir)!r} a dpfed run directory?")
    try:
        cfg = config_mod.load(cfg_path)
    except ConfigError as exc:
        raise DataError(f"{cfg_path}: not a valid run config ({exc})") from None
    summary = _load_json(run_dir / "summary.json", required=True)
    budget = _load_json(run_dir / "budget.json", required=False)
    initial = _load_safetensors(run_dir / "initial_state.safetensors")
    adapter = _load_safetensors(run_dir / "adapter" / "lorasb.safetensors")
    meta = _load_json(run_dir / "adapter" / "lorasb_config.json", required=False) or {}
    if not (run_dir / CANARIES_FILE).is_file():
        raise DataError(f"{run_dir / CANARIES_FILE}: not found: the run was trained without --canaries, and the audit "
                        f"needs what `dpfed train --canaries M` sets aside before training: the canaries (the one-run "
                        f"epsilon lower bound) and held-out non-members (the loss and reference attacks on real records); "
                        f"train again with e.g. --canaries 1000")
    canaries = load_canaries(run_dir / CANARIES_FILE)
    records_path = run_dir / ATTACK_RECORDS_FILE
    attack_records = load_attack_records(records_path) if records_path.exists() else None
    if canaries.kind != "gradient" and canaries.task != cfg.model.task:
        raise DataError(f"{run_dir / CANARIES_FILE}: canaries are for task {canaries.task!r}, the run is {cfg.model.task!r}")
    if attack_records is not None and attack_records["task"] != cfg.model.task:
        raise DataError(f"{records_path}: records are for task {attack_records['task']!r}, the run is {cfg.model.task!r}")
    missing = sorted(k for k in initial if k not in adapter)
    if missing:
        raise DataError(f"{run_dir / 'adapter' / 'lorasb.safetensors'}: missing final tensors {missing[:3]} "
                        f"that initial_state.safetensors holds")
    return RunFiles(run_dir, cfg, summary, budget, initial, adapter, meta, canaries, attack_records)


# --------------------------------------------------------------------------------------------
# Rebuilding the models
# --------------------------------------------------------------------------------------------


def build_model(files: RunFiles, *, device: torch.device | str = "cpu"
                ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapted base model with the run's frozen B, A, and its initial and final trainable states.

    Load a state with :func:`dpfed.adapters.lorasb.load_trainable_state` to switch the model between
    the initial (reference) and the final model; B and A are shared.
    """
    from dpfed.adapters.lorasb import load_trainable_state
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import load_base

    cfg = files.cfg
    task = cfg.model.task
    num_labels = 2
    if task == "classification":
        if "head.weight" not in files.initial_state:
            raise DataError(f"{files.run_dir / 'initial_state.safetensors'}: classification run without head.weight")
        num_labels = int(files.initial_state["head.weight"].shape[0])
    model = load_base(cfg.model.name, task=task, num_labels=num_labels)
    modules = [k[: -len(".B")] for k in files.adapter_state if k.endswith(".B")]
    if not modules:
        raise DataError(f"{files.run_dir / 'adapter' / 'lorasb.safetensors'}: holds no LoRA-SB factors (<module>.B)")
    scale = float(files.adapter_meta.get("scale", 1.0))
    final = {k: files.adapter_state[k] for k in files.initial_state}
    try:
        for name in modules:
            B, A = files.adapter_state[f"{name}.B"], files.adapter_state[f"{name}.A"]
            layer = inject_lorasb(model, [name], rank=int(B.shape[1]), scale=scale)[name]
            layer.set_factors(B=B, A=A, R=files.initial_state[f"{name}.R"])
        model.to(device)
        load_trainable_state(model, final)  # names and shapes must match the adapted model exactly
        load_trainable_state(model, files.initial_state)
    except (KeyError, AttributeError, RuntimeError, ValueError, ConfigError) as exc:
        raise DataError(f"{files.run_dir}: the saved states do not fit model {cfg.model.name!r} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model, dict(files.initial_state), final


# --------------------------------------------------------------------------------------------
# The claim
# --------------------------------------------------------------------------------------------


def read_claim(files: RunFiles, *, ledgers: VerifiedLedgers | None = None) -> dict[str, Any]:
    """What the run claims, read from summary.json, budget.json and (epsilon) the ledger's events.

    ``ledgers``: the run's ledgers as :func:`dpfed.rundir_check.verify_run_ledgers` returned them;
    verified here (without a key) when not given.
    """
    s, cfg = files.summary, files.cfg
    dp = bool(cfg.privacy.enabled) and s.get("epsilon_spent") is not None
    claim: dict[str, Any] = {
        "dp": dp,
        "statement": s.get("privacy"),
        "epsilon": None,
        "epsilon_source": None,
        "epsilon_target": s.get("epsilon_target"),
        "epsilon_spent_summary": s.get("epsilon_spent"),
        "epsilon_per_client": s.get("epsilon_per_client") or {},
        "delta": float(s["delta"]) if s.get("delta") is not None else float(cfg.privacy.delta),
        "noise_multiplier": s.get("noise_multiplier"),
        "clip": s.get("clip"),
        "local_steps": s.get("local_steps"),
        "batch_size": s.get("batch_size"),
        "rounds_planned": s.get("rounds_planned"),
        "rounds_completed": s.get("rounds_completed"),
        "clients": s.get("clients"),
        "clients_per_round": s.get("clients_per_round"),
        "sample_rates": s.get("sample_rates") or {},
        "sampling": "Poisson, each record independently with q_i = b / n_i per local step",
        "accountant": s.get("accountant") or (files.budget or {}).get("accountant"),
        "privacy_unit": (files.budget or {}).get("privacy_unit", "record") if dp else None,
        "trust_model": ("local DP-SGD: each client clips and noises its own updates before upload; the server, "
                        "the other clients and anyone holding a later global state or the final adapter see "
                        "only noised updates and their post-processing") if dp else "none (--no-dp)",
        "accounted": [
            "every DP-SGD step of every client (Poisson-subsampled Gaussian), composed over all rounds the "
            "client took part in; the claim is the maximum over clients of the PRV upper bound",
            "the canaries, which are records of the client shards like any other",
        ] if dp else [],
        "not_accounted": [
            "client-level privacy (whether a client took part, or all of one client's records together): not claimed",
            "amplification by client sampling: not claimed",
            "the public split read by init: public (declared public by the data owner)",
            "shard sizes n_i, which set q_i = b / n_i and are reported in summary.json",
            "hyperparameter search and repeated runs on the same data",
            "floating-point attacks on the Gaussian sampler",
        ] if dp else ["nothing: the run was trained without differential privacy"],
    }
    if not dp:
        if cfg.privacy.enabled:
            raise DataError(f"{files.run_dir / 'summary.json'}: a DP run must record epsilon_spent, got None")
        return claim
    if ledgers is None:
        try:
            ledgers = verify_run_ledgers(files.run_dir)  # never creates or writes a ledger
        except AccountingError as exc:
            raise DataError(str(exc)) from None
    claim["ledger_checks"] = list(ledgers.checks)
    if ledgers.ledger is not None:
        per_client = {c: ledgers.epsilon(c, delta=claim["delta"]) for c in ledgers.ledger.clients()}
        if per_client:
            claim["epsilon"] = max(per_client.values())
            claim["epsilon_per_client"] = per_client
            claim["epsilon_source"] = "ledger.jsonl (PRV upper bound, max over clients)"
    if claim["epsilon"] is None:
        claim["epsilon"] = float(s["epsilon_spent"])
        claim["epsilon_source"] = ("summary.json epsilon_spent" if ledgers.ledger is not None else
                                   "summary.json epsilon_spent (no ledger in the run directory: not verified)")
    return claim


# --------------------------------------------------------------------------------------------
# Statistics of one attack
# --------------------------------------------------------------------------------------------


def guesses_per_side(m: int, k_fraction: float) -> int:
    """``k = max(1, floor(k_fraction * m))`` guesses "in" and as many "out"; depends on m only."""
    if not (isinstance(k_fraction, (int, float)) and not isinstance(k_fraction, bool)
            and math.isfinite(k_fraction) and 0.0 < k_fraction <= 0.5):
        raise ConfigError(f"k_fraction must be in (0, 0.5], got {k_fraction!r}")
    if m < 2:
        raise ConfigError(f"the one-run audit needs at least 2 canaries, got {m}")
    return max(1, int(math.floor(k_fraction * m)))


def gdp_estimate(*, auc: float, fpr: np.ndarray, tpr: np.ndarray, n_pos: int, n_neg: int, delta: float) -> dict[str, Any]:
    """mu-GDP estimates of one attack, and their epsilon at ``delta``. Estimates, not bounds.

    Headline: the mu whose Gaussian trade-off curve has the observed AUC. Under mu-GDP the worst-case
    test separates N(0, 1) from N(mu, 1) (Dong, Roth & Su, arXiv 1905.02383, Definition 2.7), whose
    AUC is Phi(mu / sqrt 2), so ``mu = sqrt(2) Phi^-1(AUC)`` (0 when AUC <= 1/2). It uses the whole
    ROC curve and needs no threshold. Also reported: the largest ``Phi^-1(1 - FPR) - Phi^-1(FNR)`` over
    the ROC points, with rates ``(count + 0.5) / (n + 1)`` so that a point without errors stays
    finite; that maximum is picked on the same data and is optimistic, badly so for small n.
    """
    from scipy import special

    a = min(float(auc), 1.0 - 0.5 / (n_pos * n_neg + 1))  # AUC = 1 would give mu = inf
    mu = max(0.0, math.sqrt(2.0) * float(special.ndtri(a))) if a > 0.5 else 0.0
    fp = np.rint(np.asarray(fpr) * n_neg)
    fn = n_pos - np.rint(np.asarray(tpr) * n_pos)
    fpr_c = (fp + 0.5) / (n_neg + 1)
    fnr_c = (fn + 0.5) / (n_pos + 1)
    mus = np.array([mt.gdp_mu_from_rates(fpr=float(x), fnr=float(y)) for x, y in zip(fpr_c, fnr_c)])
    i = int(np.argmax(mus))
    mu_best = max(0.0, float(mus[i]))
    return {
        "mu": mu,
        "epsilon": mt.gdp_epsilon(mu=mu, delta=delta) if mu > 0 else 0.0,
        "delta": delta,
        "kind": "estimate from the AUC (mu = sqrt(2) Phi^-1(AUC)); not a bound",
        "best_point": {"mu": mu_best, "epsilon": mt.gdp_epsilon(mu=mu_best, delta=delta) if mu_best > 0 else 0.0,
                       "fpr": float(fpr_c[i]), "fnr": float(fnr_c[i]),
                       "kind": "largest mu over ROC points (continuity-corrected rates); optimistic"},
    }


def attack_metrics(scores: np.ndarray, members: np.ndarray, *, confidence: float, delta: float) -> dict[str, Any]:
    """AUC (bootstrap interval), TPR at 1% and 0.1% FPR (Clopper-Pearson), ROC curve and mu-GDP of one attack."""
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    fpr, tpr, _ = mt.roc_curve(scores, members)
    lo, hi = mt.bootstrap_auc_ci(scores, members, rng=np.random.default_rng(BOOTSTRAP_SEED), n_boot=N_BOOT,
                                 confidence=confidence)
    area = mt.auc(scores, members)
    out: dict[str, Any] = {"n_members": n_pos, "n_non_members": n_neg, "auc": area, "auc_ci": [lo, hi]}
    for key, target in LOW_FPRS.items():
        t = mt.tpr_at_fpr(scores, members, target, confidence=confidence)
        t["fpr_target"] = target
        t["resolvable"] = n_neg * target >= 1.0  # below 1/n_neg the only feasible FPR is 0
        out[key] = t
    out["gdp"] = gdp_estimate(auc=area, fpr=fpr, tpr=tpr, n_pos=n_pos, n_neg=n_neg, delta=delta)
    out["roc"] = {"fpr": [round(float(x), 7) for x in fpr], "tpr": [round(float(x), 7) for x in tpr]}
    return out


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_folder(name: str) -> Path | None:
    from dpfed.model import resolve_model_path

    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    try:  # a hub id: its cached snapshot, if any (offline, never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: identity without a hash
        return None


def base_model_identity(name: str) -> dict[str, Any]:
    """sha256 of every weights file of the base model, and one digest over all of them (name, digest pairs)."""
    folder = _model_folder(name)
    if folder is None:
        return {"name": name, "sha256": None, "files": {}, "note": "weights not found locally: not hashed"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    digests = {str(p.relative_to(folder)): _sha256_file(p) for p in files}
    combined = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in digests.items()).encode()).hexdigest()
    return {"name": name, "sha256": combined if digests else None, "files": digests}


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def audit_run(
    run_dir: str | Path,
    *,
    confidence: float = 0.95,
    k_fraction: float = DEFAULT_K_FRACTION,
    device: str = "cpu",
    batch_size: int = 64,
    ledger_key: bytes | None = None,
) -> dict[str, Any]:
    """Audit the run in ``run_dir``; returns the JSON-ready result that :mod:`attacks.report` writes.

    ``k = max(1, floor(k_fraction * m))`` guesses per side are fixed here, from ``m`` alone, before
    any canary is scored. The run's ledgers are checked first (``ledger_key``: the key of keyed
    ledgers, see :func:`accounting.ledger.load_key`). Raises DataError for a missing or corrupt run
    directory, LedgerCheckError or an AccountingError for ledgers that disagree with the run
    directory, ConfigError for bad arguments.
    """
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ledgers = verify_run_ledgers(run_dir, key=ledger_key)  # before anything is read from the claim
    files = load_run(run_dir)
    canaries = files.canaries
    k = guesses_per_side(canaries.m, k_fraction)  # fixed before any score exists
    if 2 * k > canaries.m:
        raise ConfigError(f"k_fraction {k_fraction} gives 2k = {2 * k} guesses for m = {canaries.m} canaries")
    claim = read_claim(files, ledgers=ledgers)
    delta = claim["delta"]

    from dpfed.adapters.lorasb import load_trainable_state
    from dpfed.data import load_tokenizer
    from dpfed.instruct import load_chat_tokenizer
    from dpfed.model import resolve_model_path

    dev = _device(device)
    cfg = files.cfg
    task, ml = cfg.model.task, cfg.model.max_length
    model, initial, final = build_model(files, device=dev)
    path = resolve_model_path(cfg.model.name)
    # an instruct model may be a GGUF file, and its records are rendered with the chat template as in training
    tokenizer = load_chat_tokenizer(cfg.model.name, path) if task == "instruct" else load_tokenizer(path)

    def losses(state: dict[str, torch.Tensor], records) -> np.ndarray:
        load_trainable_state(model, state)
        return per_record_loss(model, records, tokenizer, task=task, max_length=ml, batch_size=batch_size, device=dev,
                               chat_template=cfg.model.chat_template, system_prompt=cfg.data.system_prompt)

    if canaries.kind == "gradient":  # Dirac canaries: how far training moved each canary's coordinate along its gradient
        c_scores = canaries.scores(initial, final)
        score_text = ("-sign × (final − initial) at the canary's coordinate, after removing each matrix's best "
                      "rank-one change and dividing by the median absolute residual of its tensor (white-box)")
        canary_attack = "canary_gradient"
    else:
        canary_records = canaries.records()
        c_init, c_final = losses(initial, canary_records), losses(final, canary_records)
        c_scores = loss_reduction(loss_initial=c_init, loss_final=c_final)
        score_text = "loss(initial model) - loss(final model)"
        canary_attack = "canary_loss_reduction"
    bits = canaries.included_mask()
    one_run = mt.one_run_audit(scores=c_scores, included=bits, k_plus=k, k_minus=k, delta=delta, confidence=confidence)
    ceiling = mt.one_run_ceiling(m=canaries.m, r=2 * k, delta=delta, confidence=confidence)

    attacks: dict[str, Any] = {}
    if 0 < bits.sum() < canaries.m:
        attacks[canary_attack] = attack_metrics(c_scores, bits, confidence=confidence, delta=delta)
    if files.attack_records is not None:
        mem, non = attack_records_as_records(files.attack_records)
        m_init, m_final = losses(initial, mem), losses(final, mem)
        n_init, n_final = losses(initial, non), losses(final, non)
        labels = np.concatenate([np.ones(len(mem), dtype=bool), np.zeros(len(non), dtype=bool)])
        loss_final = np.concatenate([m_final, n_final])
        loss_init = np.concatenate([m_init, n_init])
        attacks["loss"] = attack_metrics(loss_score(loss_final), labels, confidence=confidence, delta=delta)
        attacks["reference"] = attack_metrics(reference_score(loss_final=loss_final, loss_reference=loss_init), labels,
                                              confidence=confidence, delta=delta)
    load_trainable_state(model, final)

    headline_name = "reference" if "reference" in attacks else (canary_attack if attacks else None)
    headline = attacks.get(headline_name) if headline_name else None
    eps_lb = float(one_run["epsilon_lower_bound"])
    if not claim["dp"]:
        verdict = VERDICT_NO_CLAIM
        reason = (f"the run was trained without DP and claims nothing; the audit measured epsilon_LB = {eps_lb:.3f} "
                  f"at delta = {delta:g} ({confidence:.0%} confidence)")
    elif eps_lb > claim["epsilon"]:
        verdict = VERDICT_VIOLATION
        reason = (f"epsilon_LB = {eps_lb:.3f} > claimed epsilon = {claim['epsilon']:.3f}: at {confidence:.0%} "
                  f"confidence the run is not ({claim['epsilon']:.3f}, {delta:g})-DP for its records")
    else:
        verdict = VERDICT_CONSISTENT
        reason = (f"epsilon_LB = {eps_lb:.3f} <= claimed epsilon = {claim['epsilon']:.3f}: no evidence against "
                  f"the claim (which is not evidence for it)")

    client_level = _client_level_audit(files, final, confidence=confidence, k_fraction=k_fraction)
    if client_level is not None and client_level["verdict"] == VERDICT_VIOLATION:
        verdict = VERDICT_VIOLATION
        reason += f"; client level: {client_level['verdict_reason']}"

    adapter_path = files.run_dir / "adapter" / "lorasb.safetensors"
    modules = [k_[: -len(".B")] for k_ in files.adapter_state if k_.endswith(".B")]
    base = base_model_identity(cfg.model.name)
    git = _git_commit()
    result: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "verdict": verdict,
        "verdict_reason": reason,
        "epsilon_claimed": claim["epsilon"],
        "delta": delta,
        "epsilon_lower_bound": eps_lb,
        "epsilon_lower_bound_ceiling": ceiling,
        "confidence": confidence,
        "canaries": canaries.m,
        "canaries_included": int(bits.sum()),
        "guesses": int(one_run["r"]),
        "correct": int(one_run["v"]),
        "k_plus": k,
        "k_minus": k,
        "k_fraction": k_fraction,
        "headline_attack": headline_name,
        "auc": headline["auc"] if headline else None,
        "auc_ci": headline["auc_ci"] if headline else None,
        "tpr_at_1pct_fpr": headline["tpr_at_1pct_fpr"]["tpr"] if headline else None,
        "tpr_at_0_1pct_fpr": headline["tpr_at_0_1pct_fpr"]["tpr"] if headline else None,
        "gdp_mu": headline["gdp"]["mu"] if headline else None,
        "gdp_epsilon": headline["gdp"]["epsilon"] if headline else None,
        "gdp_mu_of_claim": mt.gdp_mu_from_epsilon(epsilon=claim["epsilon"], delta=delta) if claim["dp"] and delta > 0 else None,
        # identity
        "client_level_audit": client_level,
        "run_dir": str(files.run_dir),
        "model": cfg.model.name,
        "task": task,
        "base_model_sha256": base["sha256"],
        "base_model_files": base["files"],
        "adapter": {"path": str(adapter_path.relative_to(files.run_dir)), "sha256": _sha256_file(adapter_path),
                    "initial_state_sha256": _sha256_file(files.run_dir / "initial_state.safetensors"),
                    "method": files.summary.get("method", cfg.train.method), "init": cfg.init.strategy,
                    "rank": cfg.model.rank, "adapted_modules": len(modules), "scale": float(files.adapter_meta.get("scale", 1.0))},
        "data_fingerprints": {
            "source": cfg.data.source,
            **{f"{k_}": v for k_, v in (files.summary.get("data_fingerprints") or {}).items()},
            "canaries": canaries.fingerprint(),
            "canaries_file_sha256": _sha256_file(files.run_dir / CANARIES_FILE),
            "attack_records_file_sha256": (_sha256_file(files.run_dir / ATTACK_RECORDS_FILE)
                                           if files.attack_records is not None else None),
        },
        "packages": _packages(),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "device": str(dev),
        # details
        "claim": claim,
        "one_run": {**one_run, "ceiling_at_planned_guesses": ceiling,
                    "k_rule": f"k = max(1, floor({k_fraction} * m)) per side, fixed from m before scoring",
                    "score": score_text,
                    "canary_kind": canaries.kind, "canary_length": canaries.length},
        "canary_scores": {"score": [float(x) for x in c_scores], "included": [bool(b) for b in bits]},
        "attacks": attacks,
        "limitations": _limitations(claim, one_run, ceiling, canaries.m, k, files.attack_records, attacks,
                                    kind=canaries.kind),
    }
    return result


def _client_level_audit(files: RunFiles, final: dict[str, torch.Tensor], *, confidence: float,
                        k_fraction: float) -> dict[str, Any] | None:
    """The canary-client audit of a client-level claim, when the run planted canary clients."""
    from attacks import client_canaries as cc

    path = files.run_dir / cc.CANARY_CLIENTS_FILE
    if not path.is_file():
        return None
    claim = files.summary.get("client_level") or {}
    if claim.get("epsilon") is None:
        raise DataError(f"{files.run_dir / 'summary.json'}: canary clients were planted but the run claims no "
                        "client-level epsilon")
    canaries = cc.load(path, files.initial_state)
    out = cc.audit(canaries, theta0=files.initial_state, theta_final=final, delta=float(claim["delta"]),
                   confidence=confidence, k_fraction=k_fraction)
    eps_lb, eps_c = out["epsilon_lower_bound"], float(claim["epsilon"])
    out["epsilon_claimed"] = eps_c
    out["delta"] = float(claim["delta"])
    if eps_lb > eps_c:
        out["verdict"] = VERDICT_VIOLATION
        out["verdict_reason"] = f"client-level epsilon_LB = {eps_lb:.3f} > claimed {eps_c:.3f}"
    else:
        out["verdict"] = VERDICT_CONSISTENT
        out["verdict_reason"] = f"client-level epsilon_LB = {eps_lb:.3f} <= claimed {eps_c:.3f}"
    return out


def _limitations(claim: dict[str, Any], one_run: dict[str, Any], ceiling: float, m: int, k: int,
                 attack_records: dict[str, Any] | None, attacks: dict[str, Any], *, kind: str = "random-words") -> list[str]:
    out = [
        "An empirical lower bound is not a proof of privacy. 'consistent' means this audit found no evidence "
        "against the claim; it does not show that the claim holds.",
        f"The power of a one-run audit is limited by the number of canaries: with m = {m} canaries and "
        f"{2 * k} guesses the lower bound can never exceed {ceiling:.2f}, however strong the attack.",
        "One training run with a final-model-only auditor is known to give loose bounds for DP-SGD; a gap between "
        "the lower bound and the claimed epsilon is expected and does not measure how private the model is.",
        "This is a record-level (example-level) audit. It does not test client-level privacy (whether a client "
        "took part, or all of one client's records together), which this run does not claim either.",
        ("The canaries are white-box gradient (Dirac) canaries: records whose per-sample gradient is fixed to the "
         "clip norm on one coordinate. They audit the mechanism from the per-sample gradient on (sampling, "
         "clipping, noise, aggregation, accounting) against the strongest record DP allows, not the data pipeline "
         "(tokenisation, the per-sample gradient computation); random-word canaries test that part."
         if kind == "gradient" else
         "The canaries are random-word texts (with random labels for classification), made to be easy to "
         "memorise. Real records are "
         "usually less exposed; a stronger attack (more canaries, gradient canaries, the per-round updates that "
         "the server sees) could show more."),
        "The auditor sees only the initial and final models, not the per-round updates; the claim covers those too.",
        f"The number of guesses (k = {k} per side) was fixed from m before scoring. Re-running the audit with "
        "other k and keeping the best result breaks the stated confidence.",
        "AUC, TPR at low FPR and mu-GDP are descriptive: their thresholds are picked on the same records, and "
        "mu-GDP assumes a Gaussian trade-off curve. They are estimates, not bounds.",
    ]
    if claim["dp"] and claim["epsilon"] is not None and claim["epsilon"] > ceiling:
        out.insert(2, f"The claimed epsilon ({claim['epsilon']:.3f}) is above this audit's ceiling ({ceiling:.2f}): "
                      "this audit could not have found a violation, whatever the model leaks.")
    if not claim["dp"]:
        out.insert(0, "This run was trained without differential privacy (--no-dp) and claims no guarantee; "
                      "the audit measures exposure only.")
    if attack_records is None:
        out.append("No attack_records.json in the run directory: the loss and reference attacks on real records "
                   "were not run.")
    else:
        n_neg = attacks["reference"]["n_non_members"]
        out.append(f"The real-record attacks use {attack_records['n']} members and {n_neg} non-members from a held-out "
                   f"pool carved out before training; their comparison is only as fair as that pool is a sample of "
                   f"the same data. The smallest non-zero FPR they can show is 1/{n_neg} = {1 / n_neg:.2%}"
                   + ("; TPR at 0.1% FPR is not resolved." if n_neg < 1000 else "."))
    if one_run["n_abstained_ties"]:
        out.append(f"{one_run['n_abstained_ties']} guesses were abstained on because canary scores tied at a boundary.")
    return out
