"""``dpfed flower-local``: a real Flower deployment on loopback (SuperLink + N SuperNodes) for trying it out.

Builds the run config like ``dpfed train``, starts the processes, submits the app with ``flwr
run``, shows each round as the server writes it, and tears everything down on exit, error or
Ctrl-C. Each site gets a demo partition, its own ledger under ``OUT/sites/<site-id>/`` and its
own budget (the same ε and δ). Needs the flower extra (``pip install '.[flower]'``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpfed.errors import ConfigError


def flower_local(
    sites: Annotated[int, typer.Option(help="number of sites (SuperNodes), one demo partition each")] = 3,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (default: the built-in demo defaults)")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="per-site record-level ε budget (upper bound, PRV); each site enforces it")] = None,
    delta: Annotated[Optional[float], typer.Option(help="δ per record; must be < 1/(smallest site size)")] = None,
    model: Annotated[Optional[str], typer.Option(help="embedded:all-minilm-l6-v2, a local folder, or a hub id")] = None,
    task: Annotated[Optional[str], typer.Option(help="classification | causal-lm")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="embedded:rotten_tomatoes, a csv/json/jsonl path, or a hub dataset")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="column holding the text")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="column holding the label")] = None,
    partition: Annotated[Optional[str], typer.Option(help="iid | dirichlet")] = None,
    dirichlet_alpha: Annotated[Optional[float], typer.Option(help="α of the Dirichlet label partition")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="federated rounds")] = None,
    local_steps: Annotated[Optional[int], typer.Option(help="DP-SGD steps per site per round")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="expected Poisson batch size (q = b / n_site)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="site learning rate")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA-SB rank r")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="comma-separated Linear names to adapt")] = None,
    clip: Annotated[Optional[float], typer.Option(help="per-sample clipping norm C")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="σ (default: calibrated from --epsilon)")] = None,
    client_fraction: Annotated[Optional[float], typer.Option(help="fraction of sites per round")] = None,
    init: Annotated[Optional[str], typer.Option(help="public | random")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    seed: Annotated[Optional[int], typer.Option(help="fix all randomness, the sites' noise included (reproducibility only)")] = None,
    min_sites: Annotated[int, typer.Option(help="a round completes when at least this many sites answered validly")] = 1,
    round_timeout: Annotated[float, typer.Option(help="seconds to wait for one round's replies")] = 600.0,
    tls: Annotated[bool, typer.Option("--tls", help="TLS with a throwaway CA and SuperNode authentication (default: --insecure on loopback)")] = False,
    out: Annotated[Optional[Path], typer.Option(help="run directory (must not exist or be empty)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Run Fed-SB under per-site record-level DP on a local Flower deployment (SuperLink + N SuperNodes)."""
    from rich.console import Console

    from dpfed import config as cfgmod
    from dpfed.cli.train import DEFAULT_CONFIG, _split
    from dpfed.flower.local import FlowerRunError, LocalDeployment, bin_dir, shim_app, write_toml
    from dpfed.flower.settings import check_supported

    if fmt not in ("table", "json"):
        raise ConfigError(f"format must be 'table' or 'json', got {fmt!r}")
    if sites < 1:
        raise ConfigError(f"sites must be an integer >= 1, got {sites}")
    if not 1 <= min_sites <= sites:
        raise ConfigError(f"min-sites must be in [1, sites = {sites}], got {min_sites}")
    if not round_timeout > 0:
        raise ConfigError(f"round-timeout must be a number of seconds > 0, got {round_timeout}")
    cfg = cfgmod.load(config) if config is not None else (cfgmod.load(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else cfgmod.RunConfig())
    cfg = cfgmod.override(
        cfg,
        **{"privacy.epsilon": epsilon, "privacy.delta": delta, "privacy.clip": clip,
           "privacy.noise_multiplier": noise_multiplier,
           "model.name": model, "model.task": task, "model.rank": rank, "model.target_modules": _split(target_modules),
           "data.source": dataset, "data.text_column": text_column, "data.label_column": label_column,
           "data.num_clients": sites, "data.partition": partition, "data.dirichlet_alpha": dirichlet_alpha,
           "train.rounds": rounds, "train.local_steps": local_steps, "train.batch_size": batch_size, "train.lr": lr,
           "train.client_fraction": client_fraction, "init.strategy": init, "device": device, "seed": seed},
    )
    check_supported(cfg)
    bin_dir()  # flwr installed?
    run_dir = out if out is not None else Path("runs") / time.strftime("flower-%Y%m%d-%H%M%S")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"out must be a new or empty directory, got existing '{run_dir}'")
    run_dir = run_dir.resolve()
    work = run_dir / "flower"
    work.mkdir(parents=True)
    cfg_path = work / "dpfed-config.yaml"
    cfg_path.write_text(cfgmod.to_yaml(cfg))
    run_config = write_toml(work / "run-config.toml", {
        "config": str(cfg_path), "out-dir": str(run_dir), "sites": sites, "min-sites": min_sites,
        "round-timeout": float(round_timeout), "wait-timeout": 120.0})
    nodes = []
    for i in range(sites):
        node = {"partition-id": i, "num-partitions": sites,
                "ledger": str(run_dir / "sites" / f"client-{i:03d}" / "ledger.jsonl")}
        if cfg.privacy.record_level:
            node.update({"epsilon": cfg.privacy.epsilon, "delta": cfg.privacy.delta})
        if cfg.seed is not None:
            node["seed"] = cfg.seed
        nodes.append(node)
    err = Console(stderr=True)
    quiet = fmt == "json"
    shown = [0]

    def show_rounds() -> None:  # the server appends one line per round
        path = run_dir / "metrics.jsonl"
        if quiet or not path.is_file():
            return
        for text in path.read_text().splitlines()[shown[0]:]:
            line = json.loads(text)
            shown[0] += 1
            acc, eps = line.get("accuracy"), line.get("epsilon_spent")
            err.print(f"round {line['round']}: " + (f"accuracy {acc:.4f}" if acc is not None else f"eval loss {line['eval_loss']:.4f}")
                      + (f", ε spent {eps:.3f}" if eps is not None else "")
                      + f", sites {len(line['clients'])}" + f" ({line['seconds']:.0f} s)")

    def done() -> bool:
        return (run_dir / "summary.json").is_file() or (run_dir / "error.txt").is_file()

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if not quiet:
            err.print(f"starting a SuperLink and {sites} SuperNodes on 127.0.0.1 ("
                      + ("TLS, SuperNode authentication" if tls else "--insecure: loopback only") + f"); logs in {work / 'logs'}")
        with LocalDeployment(work, node_configs=nodes, tls=tls) as deployment:
            run_id = deployment.submit(shim_app(work / "app"), run_config)
            if not quiet:
                err.print(f"flwr run {run_id}: the server prepares the job, then {cfg.train.rounds} rounds")
            status = deployment.wait(run_id, timeout=900.0 + (cfg.train.rounds + 1) * round_timeout, done=done,
                                     on_poll=show_rounds)
            deployment.save_run_log(run_id, work / "logs" / "serverapp.log")
        show_rounds()
    except FlowerRunError as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the deployment has been torn down by now
        err.print(f"interrupted: the SuperLink and the {sites} SuperNodes were stopped; {run_dir} is incomplete")
        raise typer.Exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if (run_dir / "error.txt").is_file():  # the server stopped on an input error: one line, exit 2
        raise ConfigError((run_dir / "error.txt").read_text().strip())
    if status != "finished:completed" or not (run_dir / "summary.json").is_file():
        err.print(f"error: the Flower run ended with status {status!r}; logs in {work / 'logs'}")
        raise typer.Exit(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    if quiet:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, run_dir)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def _print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    fl = summary["flower"]
    t = Table(title=f"dpfed flower-local — {summary['method']} on {len(fl['sites'])} sites", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    eps = summary["epsilon_target"]
    rows = [
        ("privacy", summary["privacy"]),
        ("ε target / spent (max over sites, PRV upper)", "—" if eps is None else f"{eps:g} / {summary['epsilon_spent']:.3f}"),
        ("δ (per record)", "—" if summary["delta"] is None else f"{summary['delta']:g}"),
        ("noise multiplier σ / clip C",
         "—" if summary["noise_multiplier"] is None else f"{summary['noise_multiplier']:g} / {summary['clip']:g}"),
        ("rounds completed", f"{summary['rounds_completed']} / {summary['rounds_planned']}"
         + ("" if summary["stop_reason"] == "completed" else f" (stopped: {summary['stop_reason']})")),
        ("sites (per round, minimum)", f"{summary['clients']} ({summary['clients_per_round']}, {fl['min_sites']})"),
        ("replies rejected / sites refused / failed", f"{fl['replies_rejected']} / {fl['sites_refused']} / {fl['sites_failed']}"),
        ("test accuracy" if summary["accuracy"] is not None else "eval loss",
         f"{summary['accuracy']:.4f}" if summary["accuracy"] is not None else f"{summary['eval_loss']:.4f}"),
        ("bytes up / down per site per round", f"{summary['bytes_up_per_client_round']} / {summary['bytes_down_per_client_round']}"),
        ("wall time (rounds) / server setup", f"{summary['wall_seconds']:.0f} s / {summary['setup_seconds']:.0f} s"),
        ("site ledgers", str(run_dir / "sites")),
        ("run directory", str(run_dir)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)

