"""``dpfed compare``: Fed-SB and the LoRA baselines at the same (ε, δ): accuracy, bytes, noise amplification."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpfed import config as cfgmod
from dpfed.cli import options
from dpfed.errors import ConfigError

DEFAULT_COMPARE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "compare.yaml"


def _epsilons(text: str | None, no_dp: bool) -> list[float | None]:
    values: list[float | None] = []
    if text:
        for part in text.split(","):
            try:
                eps = float(part)
            except ValueError:
                raise ConfigError(f"--epsilon must be comma-separated numbers > 0, got {text!r}") from None
            if not (math.isfinite(eps) and eps > 0):
                raise ConfigError(f"--epsilon must be comma-separated finite numbers > 0, got {text!r}")
            values.append(eps)
    if no_dp:
        values.append(None)
    if not values:
        raise ConfigError("give --epsilon E[,E2,...] and/or --no-dp")
    return values


def compare(
    methods: Annotated[str, typer.Option(help="comma-separated: fed-sb,fedit,ffa-lora,fedex-lora,flora")] = "fed-sb,fedit,ffa-lora,fedex-lora,flora",
    epsilon: Annotated[Optional[str], typer.Option(help="per-client ε, one or several (e.g. 1,3,8)")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="also train every method without DP (no guarantee)")] = False,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 (after --seed) for mean ± std")] = 1,
    seed: Annotated[int, typer.Option(help="first seed")] = 0,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (default: configs/compare.yaml)")] = None,
    delta: options.Delta = None,
    model: options.Model = None,
    dataset: options.Dataset = None,
    text_column: options.TextColumn = None,
    label_column: options.LabelColumn = None,
    prompt_column: options.PromptColumn = None,
    response_column: options.ResponseColumn = None,
    template: options.Template = None,
    labels: options.Labels = None,
    public_data: options.PublicData = None,
    public_fraction: options.PublicFraction = None,
    drop_invalid: options.DropInvalid = False,
    clients: options.Clients = None,
    rounds: options.Rounds = None,
    local_steps: options.LocalSteps = None,
    batch_size: options.BatchSize = None,
    lr: options.Lr = None,
    rank: options.Rank = None,
    lora_alpha: options.LoraAlpha = None,
    clip: options.Clip = None,
    device: options.Device = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (new or empty)")] = None,
    fmt: options.Format = "table",
) -> None:
    """Train every method at every ε on the same data, clients and seeds; write compare.json/.md and plots."""
    from rich.console import Console
    from rich.table import Table

    from dpfed.compare import aggregate_seeds, compare as run_compare, markdown, plots
    from dpfed.config import METHODS

    if fmt not in ("table", "json"):
        raise ConfigError(f"format must be 'table' or 'json', got {fmt!r}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise ConfigError(f"methods must be a comma-separated subset of {','.join(METHODS)}, got {methods!r}")
    eps_list = _epsilons(epsilon, no_dp)
    if seeds < 1:
        raise ConfigError(f"seeds must be an integer >= 1, got {seeds}")
    if seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed}")
    base = options.base_config(config, default=DEFAULT_COMPARE_CONFIG)
    if base.init.strategy == "dp":  # init 'dp' is Fed-SB only: every method starts data-free
        base = cfgmod.override(base, **{"init.strategy": "random"})
    base, notes = options.run_config(
        base, delta=delta, model=model, dataset=dataset, text_column=text_column, label_column=label_column,
        prompt_column=prompt_column, response_column=response_column, template=template, labels=labels, public_data=public_data, public_fraction=public_fraction, drop_invalid=drop_invalid,
        clients=clients, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr, rank=rank,
        lora_alpha=lora_alpha, clip=clip, device=device,
    )
    if base.privacy.client_level:
        raise ConfigError("compare runs record-level DP only: privacy.unit must be 'record', got "
                          f"{base.privacy.unit!r}")
    out_dir = out if out is not None else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out must be a new or empty directory, got existing '{out_dir}'")
    out_dir.mkdir(parents=True, exist_ok=True)
    err = Console(stderr=True)
    quiet = fmt == "json"
    for line in notes:
        err.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)

    def progress(kind, info):
        if quiet:
            return
        if kind == "cell":
            err.print(f"[bold]{info['tag']}[/]")
        elif kind == "row":
            amp = info["noise_amplification"]
            err.print(f"  accuracy {info['accuracy']:.4f}, bytes up {info['bytes_up_per_client_round']:,}, "
                      f"noise amplification {'-' if amp is None else f'{amp:.3g}'}, {info['seconds']:.0f} s")

    t0 = time.time()
    rows = run_compare(base, methods=chosen, epsilons=eps_list, seeds=list(range(seed, seed + seeds)), out=out_dir,
                       progress=progress)
    table_rows = aggregate_seeds(rows)
    result = {"methods": table_rows, "cells": rows, "config": str(config or DEFAULT_COMPARE_CONFIG),
              "delta": base.privacy.delta, "seeds": list(range(seed, seed + seeds)), "wall_seconds": time.time() - t0,
              "note": "same (epsilon, delta), sample rate, steps and noise multiplier for every method; "
                      "noise_amplification = ||dW_noisy - dW_clean||_F / ||dW_clean||_F at the end, over all adapted "
                      "layers, from a noise-free twin run with the same sampled batches"}
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown(table_rows))
    result["plots"] = [str(p) for p in plots(table_rows, out_dir)]
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    if quiet:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"dpfed compare (δ = {base.privacy.delta:g}; {out_dir})")
    for col in ("method", "ε", "accuracy", "noise ampl.", "agg. error", "bytes up", "bytes down", "trainable"):
        table.add_column(col)
    for r in table_rows:
        acc = f"{r['accuracy']:.4f}" + (f" ± {r['accuracy_std']:.4f}" if "accuracy_std" in r else "")
        amp = "-" if r["noise_amplification"] is None else f"{r['noise_amplification']:.3g}"
        table.add_row(r["method"], "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}", acc, amp,
                      "-" if r["aggregation_error"] is None else f"{r['aggregation_error']:.2g}",
                      f"{r['bytes_up_per_client_round']:,}", f"{r['bytes_down_per_client_round']:,}",
                      f"{r['trainable_params']:,}")
    Console().print(table)
