"""``dpfed compare``: every method through the same runner, data, clients, seeds and accountant.

For each (seed, ε, method) the method trains once as a normal run (its own run directory),
and once more as a *noise-amplification twin*: the same initial state, the same seeds and so
the same Poisson-sampled batches, the same clipping, but no noise (σ is still what the
accountant planned; only the draw is skipped). The ratio
``‖ΔW_noisy − ΔW_clean‖_F / ‖ΔW_clean‖_F``, with ΔW each adapted layer's total change of its
effective weight (``dpfed.methods``), after round 1 and at the end, measures how much of the
DP noise reaches the weights (Fed-SB paper, arXiv 2502.15436, Sec. 4.2). The twin is a
measurement, not a release: its run directory is marked, it carries no guarantee, and only
the ratio leaves it. With ``--no-dp`` there is no noise and no twin.

Fed-SB's noise has a closed form per client step: with orthonormal B and A,
``‖B ξ_R A‖_F = ‖ξ_R‖_F`` and ``E‖ξ_R‖_F ≈ lr · σ C / b · √(Σ r²)`` (SGD on the noised mean).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfed import config as cfgmod
from dpfed.methods import FedSB
from dpfed.config import RunConfig


@dataclass(frozen=True)
class Cell:
    method: str
    epsilon: float | None  # None: --no-dp
    seed: int


def _ratio(noisy: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    per_layer = {}
    num = den = 0.0
    for n in clean:
        d = float((noisy[n].double() - clean[n].double()).pow(2).sum())
        c = float(clean[n].double().pow(2).sum())
        per_layer[n] = math.sqrt(d / c) if c > 0 else float("inf")
        num, den = num + d, den + c
    return (math.sqrt(num / den) if den > 0 else float("inf")), per_layer


def _train(cfg: RunConfig, run_dir: Path, *, data_from, noise: bool) -> tuple[dict[str, Any], dict[int, dict], Any]:
    """One run; returns its summary, the effective deltas after round 1 and at the end, and the job."""
    from dpfed.runner import prepare, run

    job = prepare(cfg, data_from=data_from, noise_enabled=noise)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def progress(kind: str, info: dict[str, Any]) -> None:
        if kind == "round" and info["round"] == 1:
            snaps[1] = job.method.effective_deltas()

    summary = run(job, run_dir, progress=progress)
    snaps[-1] = job.method.effective_deltas()
    return summary, snaps, job


def compare(base: RunConfig, *, methods: Sequence[str], epsilons: Sequence[float | None], seeds: Sequence[int],
            out: Path, progress: Callable[[str, dict[str, Any]], None] = lambda k, i: None) -> list[dict[str, Any]]:
    """Train every (seed, ε, method) cell and its twin; return one row per cell (see ``compare.json``)."""
    rows = []
    data_job = None
    for seed in seeds:
        data_job = None  # a new seed is a new split
        for eps in epsilons:
            for method in methods:
                over: dict[str, Any] = {"train.method": method, "seed": seed}
                if eps is None:
                    over["privacy.enabled"] = False
                else:
                    over.update({"privacy.enabled": True, "privacy.epsilon": eps})
                cfg = cfgmod.override(base, **over)
                tag = f"{method}-{'nodp' if eps is None else f'eps{eps:g}'}-seed{seed}"
                progress("cell", {"tag": tag})
                t0 = time.time()
                summary, snaps, job = _train(cfg, out / tag, data_from=data_job, noise=True)
                data_job = data_job or job
                row: dict[str, Any] = {
                    "method": method, "epsilon": eps, "seed": seed,
                    "epsilon_spent": summary["epsilon_spent"], "noise_multiplier": summary["noise_multiplier"],
                    "accuracy": summary["accuracy"], "eval_loss": summary["eval_loss"],
                    "initial_accuracy": summary["initial_eval"].get("accuracy"),
                    "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
                    "bytes_down_per_client_round": summary["bytes_down_per_client_round"],
                    "trainable_params": summary["trainable_params"],
                    "aggregation_error": summary["aggregation_error_max"],
                    "rounds_completed": summary["rounds_completed"],
                    "run_dir": str(out / tag), "seconds": None,
                    "noise_amplification": None, "noise_amplification_round1": None,
                    "noise_amplification_per_layer": None, "twin_run_dir": None,
                    "analytic_noise_per_step": _fed_sb_noise(cfg, job, summary) if isinstance(job.method, FedSB) else None,
                }
                if eps is not None:
                    progress("cell", {"tag": tag + " (noise-free twin)"})
                    _, clean, _ = _train(cfg, out / (tag + "-twin-clean"), data_from=data_job, noise=False)
                    row["noise_amplification"], row["noise_amplification_per_layer"] = _ratio(snaps[-1], clean[-1])
                    if 1 in snaps and 1 in clean:
                        row["noise_amplification_round1"], _ = _ratio(snaps[1], clean[1])
                    row["twin_run_dir"] = str(out / (tag + "-twin-clean"))
                row["seconds"] = time.time() - t0
                rows.append(row)
                progress("row", row)
    return rows


def _fed_sb_noise(cfg: RunConfig, job, summary: dict[str, Any]) -> float | None:
    """``lr · σ C / b · √(Σ r²)``: the expected Frobenius norm of one client step's noise on all of B ξ A."""
    if summary["noise_multiplier"] is None or cfg.train.optimizer != "sgd":
        return None
    r2 = sum(layer.rank ** 2 for layer in job.adapters.values())
    return cfg.train.lr * summary["noise_multiplier"] * cfg.privacy.clip / cfg.train.batch_size * math.sqrt(r2)


def aggregate_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, ε): mean and std over seeds of the numeric fields."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["epsilon"]), []).append(r)
    out = []
    for (method, eps), rs in groups.items():
        row: dict[str, Any] = {"method": method, "epsilon": eps, "seeds": [r["seed"] for r in rs]}
        for key in ("accuracy", "eval_loss", "noise_amplification", "noise_amplification_round1", "aggregation_error",
                    "epsilon_spent", "bytes_up_per_client_round", "bytes_down_per_client_round", "trainable_params",
                    "noise_multiplier", "analytic_noise_per_step", "initial_accuracy"):
            vals = [r[key] for r in rs if r[key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
            if key in ("accuracy", "noise_amplification") and len(vals) > 1:
                row[key + "_std"] = float(np.std(vals, ddof=1))
        first = rs[0]
        row["noise_amplification_per_layer"] = first["noise_amplification_per_layer"]
        row["run_dir"] = first["run_dir"]
        if len(rs) > 1:
            row["run_dirs"] = [r["run_dir"] for r in rs]
        for key in ("bytes_up_per_client_round", "bytes_down_per_client_round", "trainable_params"):
            row[key] = int(row[key]) if row[key] is not None else None
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| method | ε | accuracy | noise amplification (end / round 1) | aggregation error | "
            "bytes up / client / round | bytes down / client / round | trainable params |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}" + (
            f" ± {r['accuracy_std']:.4f}" if "accuracy_std" in r else "")
        amp = "-" if r["noise_amplification"] is None else (
            f"{r['noise_amplification']:.3g} / {r['noise_amplification_round1']:.3g}"
            if r["noise_amplification_round1"] is not None else f"{r['noise_amplification']:.3g}")
        err = "-" if r["aggregation_error"] is None else f"{r['aggregation_error']:.2g}"
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lines.append(f"| {r['method']} | {eps} | {acc} | {amp} | {err} | {r['bytes_up_per_client_round']:,} | "
                     f"{r['bytes_down_per_client_round']:,} | {r['trainable_params']:,} |")
    return head + "\n".join(lines) + "\n"


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_bytes.png (log x), accuracy_vs_epsilon.png, noise_amplification.png."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    methods = list(dict.fromkeys(r["method"] for r in rows))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r["accuracy"] is not None]
        ax.scatter([r["bytes_up_per_client_round"] for r in rs], [r["accuracy"] for r in rs], label=m)
        for r in rs:
            ax.annotate("no DP" if r["epsilon"] is None else f"ε={r['epsilon']:g}",
                        (r["bytes_up_per_client_round"], r["accuracy"]), fontsize=7)
    ax.set(xscale="log", xlabel="bytes up per client per round (log)", ylabel="accuracy",
           title="accuracy against bytes sent")
    ax.legend(fontsize=8)
    written.append(out / "accuracy_vs_bytes.png")
    FigureCanvasAgg(fig).print_png(str(written[-1]))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m and r["epsilon"] is not None and r["accuracy"] is not None),
                    key=lambda r: r["epsilon"])
        if rs:
            ax.plot([r["epsilon"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=m)
    ax.set(xlabel="ε (per client, record level)", ylabel="accuracy", title="accuracy against ε")
    ax.legend(fontsize=8)
    written.append(out / "accuracy_vs_epsilon.png")
    FigureCanvasAgg(fig).print_png(str(written[-1]))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    rs = [r for r in rows if r["noise_amplification"] is not None]
    labels = [f"{r['method']}\nε={r['epsilon']:g}" for r in rs]
    ax.bar(range(len(rs)), [r["noise_amplification"] for r in rs])
    ax.set_xticks(range(len(rs)), labels, fontsize=7)
    ax.set(yscale="log", ylabel="‖ΔW_noisy − ΔW_clean‖ / ‖ΔW_clean‖ (end)", title="noise amplification")
    written.append(out / "noise_amplification.png")
    FigureCanvasAgg(fig).print_png(str(written[-1]))
    return written
