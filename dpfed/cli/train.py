"""``dpfed train``: federated rounds of DP fine-tuning (Fed-SB), in process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpfed.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _split(v: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if v is None else tuple(x.strip() for x in v.split(",") if x.strip())


def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (default: the built-in demo defaults)")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="per-client record-level ε budget (upper bound, PRV)")] = None,
    delta: Annotated[Optional[float], typer.Option(help="δ per record; must be < 1/(smallest client size)")] = None,
    model: Annotated[Optional[str], typer.Option(help="embedded:all-minilm-l6-v2, a local folder, or a hub id")] = None,
    task: Annotated[Optional[str], typer.Option(help="classification | causal-lm")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="embedded:rotten_tomatoes, a csv/tsv/json/jsonl/parquet file, or a hub dataset; "
                                                   "a user dataset gets no public slice unless one is declared")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="column holding the text (default: text)")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="column holding the label (default: label)")] = None,
    labels: Annotated[Optional[str], typer.Option(help="the label set, comma-separated, in head-index order "
                                                  "(default: the labels of the test split and the public data)")] = None,
    public_data: Annotated[Optional[str], typer.Option(help="a file of records declared public (same columns): fits the "
                                                       "head/init without DP, outside ε")] = None,
    public_fraction: Annotated[Optional[float], typer.Option(help="declare this fraction of the dataset public (fits the "
                                                             "head/init without DP, outside ε; the count is printed)")] = None,
    drop_invalid: Annotated[bool, typer.Option("--drop-invalid", help="drop records with an empty/NaN label or a null/empty "
                                               "text (the count is printed) instead of refusing the file")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved config (YAML) and exit")] = False,
    clients: Annotated[Optional[int], typer.Option(help="number of simulated sites")] = None,
    partition: Annotated[Optional[str], typer.Option(help="iid | dirichlet")] = None,
    dirichlet_alpha: Annotated[Optional[float], typer.Option(help="α of the Dirichlet label partition")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="federated rounds")] = None,
    local_steps: Annotated[Optional[int], typer.Option(help="DP-SGD steps per client per round")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="expected Poisson batch size (q = b / n_client)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="client learning rate")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA-SB rank r")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="comma-separated Linear names to adapt")] = None,
    clip: Annotated[Optional[float], typer.Option(help="per-sample clipping norm C")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="σ (default: calibrated from --epsilon)")] = None,
    client_fraction: Annotated[Optional[float], typer.Option(help="fraction of clients per round")] = None,
    method: Annotated[Optional[str], typer.Option(help="federated method (fed-sb)")] = None,
    init: Annotated[Optional[str], typer.Option(help="public | dp (DP estimate from client data, in the ledger) | random")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    seed: Annotated[Optional[int], typer.Option(help="fix all randomness (noise included) for reproducibility")] = None,
    privacy_unit: Annotated[Optional[str], typer.Option(help="record (local DP-SGD) | client (DP-FedAvg; trusted server adds noise) | both")] = None,
    client_clip: Annotated[Optional[float], typer.Option(help="client-level: L2 clip S of each client's update")] = None,
    client_noise_multiplier: Annotated[Optional[float], typer.Option(help="client-level σ_c (default: calibrated from --client-epsilon)")] = None,
    client_epsilon: Annotated[Optional[float], typer.Option(help="client-level ε budget over all rounds (PRV upper bound)")] = None,
    client_delta: Annotated[Optional[float], typer.Option(help="client-level δ (default: --delta); must be < 1/clients")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue RUN_DIR from its last checkpoint and ledger (other options except --device/--format/--ledger-key are refused)")] = None,
    ledger_key: Annotated[Optional[Path], typer.Option(help="HMAC key file for the ledger (created mode 0600 if missing; keep it outside the run directory): edits by anyone without it are detected")] = None,
    canaries: Annotated[Optional[int], typer.Option(help="plant M audit canaries (each with probability 1/2) for dpfed audit")] = None,
    canary_kind: Annotated[Optional[str], typer.Option(help="gradient (default; white-box: fixed per-sample gradients) | random-words (input-space records)")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="train without DP (comparison only: NO privacy guarantee)")] = False,
    out: Annotated[Optional[Path], typer.Option(help="run directory (must not exist or be empty)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Fine-tune with Fed-SB across simulated sites under per-client record-level DP."""
    from rich.console import Console

    from dpfed import config as cfgmod
    from dpfed.runner import claim_run_dir, release_claim

    if fmt not in ("table", "json"):
        raise ConfigError(f"format must be 'table' or 'json', got {fmt!r}")
    if resume is not None:
        given = [k for k, v in locals().items()
                 if k not in ("resume", "fmt", "device", "no_dp", "ledger_key") and not k.startswith("_") and v is not None
                 and k in _OPTION_NAMES]
        given += [k for k, v in (("no_dp", no_dp), ("drop_invalid", drop_invalid), ("print_config", print_config)) if v]
        if given:
            raise ConfigError(f"--resume continues a run with its recorded config; got other options: "
                              f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        _resume(resume, device=device, fmt=fmt, key=_ledger_key(ledger_key, create=False))
        return
    cfg = cfgmod.load(config) if config is not None else (cfgmod.load(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else cfgmod.RunConfig())
    replaced = dataset is not None and dataset != cfg.data.source
    cfg = cfgmod.override(
        cfg,
        **{"privacy.epsilon": epsilon, "privacy.delta": delta, "privacy.clip": clip,
           "privacy.noise_multiplier": noise_multiplier, "privacy.enabled": False if no_dp else None,
           "model.name": model, "model.task": task, "model.rank": rank, "model.target_modules": _split(target_modules),
           "data.source": dataset, "data.text_column": text_column, "data.label_column": label_column,
           "data.labels": _split(labels), "data.public_source": public_data, "data.public_fraction": public_fraction,
           "data.drop_invalid": True if drop_invalid else None,
           "data.num_clients": clients, "data.canaries": canaries, "data.canary_kind": canary_kind, "data.partition": partition, "data.dirichlet_alpha": dirichlet_alpha,
           "train.rounds": rounds, "train.local_steps": local_steps, "train.batch_size": batch_size, "train.lr": lr,
           "train.client_fraction": client_fraction, "train.method": method, "init.strategy": init,
           "privacy.unit": privacy_unit, "privacy.client_clip": client_clip,
           "privacy.client_noise_multiplier": client_noise_multiplier, "privacy.client_epsilon": client_epsilon,
           "privacy.client_delta": client_delta,
           "device": device, "seed": seed},
    )
    notes: list[str] = []
    if replaced and public_fraction is None:  # the config's public_fraction was declared for its own dataset
        cfg, line = _no_public_slice(cfg, init_given=init is not None)
        notes += [line] if line else []
    cfg = cfgmod.resolve_data_paths(cfg)  # absolute: --resume works from anywhere; a missing path is an error, not a hub lookup
    if print_config:
        for line in notes:
            Console(stderr=True).print(line, markup=False, highlight=False, soft_wrap=True)
        print(cfgmod.to_yaml(cfg), end="")
        return
    run_dir = out if out is not None else Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    key = _ledger_key(ledger_key)
    created = claim_run_dir(run_dir)  # before the setup: a second run on the same --out fails at once
    try:
        summary = _train_claimed(cfg, run_dir, created=created, notes=notes, fmt=fmt, key=key)
    except BaseException:
        release_claim(run_dir, created=created)  # removes only the claim, and the directory if dpfed made it and it is empty
        raise
    if fmt == "json":
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, run_dir)


def _ledger_key(path: Optional[Path], *, create: bool = True) -> Optional[bytes]:
    """The site's ledger key (HMAC): read it, or create it (mode 0600) for a new run when the file does not exist."""
    if path is None:
        return None
    from accounting.ledger import load_key, new_key_file

    if create and not path.exists():
        new_key_file(path)
    return load_key(path)


def _train_claimed(cfg, run_dir: Path, *, created: bool, notes: list[str], fmt: str, key: Optional[bytes]) -> dict:
    from rich.console import Console

    from dpfed.runner import prepare, run

    err = Console(stderr=True)
    quiet = fmt == "json"
    if not cfg.privacy.enabled:
        err.print("[bold red]--no-dp: training WITHOUT differential privacy; no privacy guarantee holds.[/]")

    def on_setup(kind: str, info: dict) -> None:
        if kind == "data":
            notes.extend(info["notes"])

    with err.status("preparing data, model and adapter...", spinner="dots") if not quiet else _Null():
        job = prepare(cfg, progress=on_setup)
    # printed once everything is validated, so that a refused run prints its one error line only
    for line in notes:
        err.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)
    if "head_source" in job.init_info:
        err.print(f"classification head: {job.init_info['head_source']}", markup=False, highlight=False, soft_wrap=True)
    if not quiet and job.noise_multiplier is not None:
        err.print(f"noise multiplier σ = {job.noise_multiplier:g} for ε = {cfg.privacy.epsilon:g}, δ = {cfg.privacy.delta:g} "
                  f"over {cfg.train.rounds} rounds × {cfg.train.local_steps} local steps (worst client)")
    return run(job, run_dir, progress=_progress(err, cfg, quiet), ledger_key=key, claimed=created)


def _no_public_slice(cfg, *, init_given: bool):
    """A user dataset that replaced the config's: no slice of it is public; without a public file, init/head leave 'public'."""
    from dpfed import config as cfgmod

    changes = {"data.public_fraction": 0.0}
    switched = []
    if cfg.data.public_source is None:
        if cfg.init.head == "public":
            changes["init.head"] = "random"
            switched.append("init.head")
        if cfg.init.strategy == "public" and not init_given:
            changes["init.strategy"] = "random"
            switched.append("init.strategy")
    cfg = cfgmod.override(cfg, **changes)
    if not switched:
        return cfg, ""
    return cfg, (f"--dataset {cfg.data.source}: no public data declared, so no public slice; {' and '.join(switched)} "
                 f"'public' -> 'random' (declare public records with --public-data FILE or --public-fraction F)")


_OPTION_NAMES = ("config", "epsilon", "delta", "model", "task", "dataset", "text_column", "label_column", "clients",
                 "partition", "dirichlet_alpha", "rounds", "local_steps", "batch_size", "lr", "rank", "target_modules",
                 "clip", "noise_multiplier", "client_fraction", "method", "init", "seed", "out", "privacy_unit",
                 "client_clip", "client_noise_multiplier", "client_epsilon", "client_delta", "canaries", "canary_kind",
                 "labels", "public_data", "public_fraction")


def _resume(run_dir: Path, *, device: Optional[str], fmt: str, key: Optional[bytes]) -> None:
    from rich.console import Console

    from dpfed import config as cfgmod
    from dpfed.runner import resume

    if not run_dir.is_dir():
        raise ConfigError(f"--resume must name an existing run directory, got '{run_dir}'")
    err = Console(stderr=True)
    quiet = fmt == "json"
    cfg = cfgmod.load(run_dir / "config.yaml")
    summary = resume(run_dir, device=device, progress=_progress(err, cfg, quiet), ledger_key=key)
    if quiet:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, run_dir)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(console, cfg, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return lambda kind, info: None
    state: dict = {}

    def on(kind: str, info: dict) -> None:
        if kind == "start":
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=console, transient=False)
            bar.start()
            total = info["rounds"] * info["clients_per_round"] * info["local_steps"]
            state.update(bar=bar, steps=bar.add_task("client steps", total=total),
                         rounds=bar.add_task("rounds", total=info["rounds"]))
            acc = info["eval"].get("accuracy")
            console.print("before training: " + (f"accuracy {acc:.4f}" if acc is not None else f"eval loss {info['eval']['eval_loss']:.4f}"))
        elif kind == "client" and "bar" in state:
            state["bar"].update(state["steps"], description=f"round {info['round']} {info['client']}")
        elif kind == "step" and "bar" in state:
            state["bar"].advance(state["steps"])
        elif kind == "round" and "bar" in state:
            state["bar"].advance(state["rounds"])
            acc = info.get("accuracy")
            eps = info.get("epsilon_spent")
            console.print(f"round {info['round']}: " + (f"accuracy {acc:.4f}" if acc is not None else f"eval loss {info['eval_loss']:.4f}")
                          + (f", ε spent {eps:.3f}" if eps is not None else "") + f" ({info['seconds']:.0f} s)")
            if info["round"] == cfg.train.rounds:
                state["bar"].stop()

    return on


def _print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"dpfed train — {summary['method']}", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("privacy", summary["privacy"]),
        ("ε target / spent (max over clients, PRV upper)",
         "—" if summary["epsilon_target"] is None else f"{summary['epsilon_target']:g} / {summary['epsilon_spent']:.3f}"),
        ("δ (per record)", "—" if summary["delta"] is None else f"{summary['delta']:g}"),
        ("noise multiplier σ / clip C",
         "—" if summary["noise_multiplier"] is None else f"{summary['noise_multiplier']:g} / {summary['clip']:g}"),
        ("client-level ε / δ (DP-FedAvg; trusted server)",
         "—" if not summary.get("client_level") else
         f"{summary['client_level']['epsilon']:.3f} / {summary['client_level']['delta']:g} "
         f"(σ_c {summary['client_level']['noise_multiplier']:g}, S {summary['client_level']['clip']:g})"),
        ("rounds completed", f"{summary['rounds_completed']} / {summary['rounds_planned']}"
         + ("" if summary.get("stop_reason") in (None, "completed") else f" (stopped: {summary['stop_reason']})")),
        ("clients (per round)", f"{summary['clients']} ({summary['clients_per_round']})"),
        ("test accuracy" if summary["accuracy"] is not None else "eval loss",
         f"{summary['accuracy']:.4f}" if summary["accuracy"] is not None else f"{summary['eval_loss']:.4f}"),
        ("accuracy before federated training",
         f"{summary['initial_eval'].get('accuracy', float('nan')):.4f}"),
        ("bytes up / down per client per round", f"{summary['bytes_up_per_client_round']} / {summary['bytes_down_per_client_round']}"),
        ("trainable parameters", str(summary["trainable_params"])),
        ("wall time (training) / setup", f"{summary['wall_seconds']:.0f} s / {summary['setup_seconds']:.0f} s"),
        ("device", summary["device"]),
        ("run directory", str(run_dir)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
