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

from dpfed import config as cfgmod
from dpfed.cli import options
from dpfed.errors import ConfigError


RESUME_FLAGS = ("--resume", "--min-sites", "--round-timeout", "--tls", "--format")  # what --resume accepts


def flower_local(
    ctx: typer.Context,
    sites: Annotated[int, typer.Option(help="number of sites (SuperNodes), one demo partition each")] = 3,
    config: options.Config = None,
    epsilon: options.Epsilon = None,
    delta: options.Delta = None,
    model: options.Model = None,
    task: options.Task = None,
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
    partition: options.Partition = None,
    dirichlet_alpha: options.DirichletAlpha = None,
    rounds: options.Rounds = None,
    local_steps: options.LocalSteps = None,
    batch_size: options.BatchSize = None,
    lr: options.Lr = None,
    rank: options.Rank = None,
    target_modules: options.TargetModules = None,
    clip: options.Clip = None,
    noise_multiplier: options.NoiseMultiplier = None,
    client_fraction: options.ClientFraction = None,
    init: options.Init = None,
    device: options.Device = None,
    seed: options.Seed = None,
    aggregation: options.Aggregation = None,
    secure_min_sites: options.MinSites = None,
    min_sites: Annotated[int, typer.Option(help="a round completes when at least this many sites answered validly")] = 1,
    round_timeout: Annotated[float, typer.Option(help="seconds to wait for one round's replies")] = 600.0,
    tls: Annotated[bool, typer.Option("--tls", help="TLS with a throwaway CA and SuperNode authentication (default: --insecure on loopback)")] = False,
    out: options.Out = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="continue the interrupted flower-local run in this directory from its last checkpoint "
                         "(same sites, their ledgers kept); no other run option may be given")] = None,
    fmt: options.Format = "table",
) -> None:
    """Run Fed-SB under per-site record-level DP on a local Flower deployment (SuperLink + N SuperNodes)."""
    from rich.console import Console

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
    if resume is not None:
        refused = [flag for flag in options.given(ctx) if flag not in RESUME_FLAGS]
        if refused:
            raise ConfigError(f"--resume continues the run with its own config.yaml: {', '.join(refused)} must not "
                              f"be given with it")
        run_dir = resume.resolve()
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
            raise ConfigError(f"--resume must name a flower-local run directory with config.yaml and run.json, "
                              f"got '{resume}'")
        if (run_dir / "summary.json").is_file():
            raise ConfigError(f"--resume: the run in '{resume}' is complete (summary.json exists); nothing to resume")
        cfg, notes = cfgmod.load(run_dir / "config.yaml"), []
        sites = cfg.data.num_clients
        if not 1 <= min_sites <= sites:
            raise ConfigError(f"min-sites must be in [1, sites = {sites}], got {min_sites}")
        bin_dir()  # flwr installed?
        work = run_dir / "flower" / time.strftime("resume-%Y%m%d-%H%M%S")
        work.mkdir(parents=True)
        server = {"out-dir": str(run_dir), "resume": True}
    else:
        cfg, notes = options.run_config(
            options.base_config(config), epsilon=epsilon, delta=delta, model=model, task=task, dataset=dataset,
            text_column=text_column, label_column=label_column, prompt_column=prompt_column,
            response_column=response_column, template=template, labels=labels, public_data=public_data,
            public_fraction=public_fraction, drop_invalid=drop_invalid, clients=sites, partition=partition,
            dirichlet_alpha=dirichlet_alpha, rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
            rank=rank, target_modules=target_modules, client_fraction=client_fraction, init=init, device=device,
            seed=seed, clip=clip, noise_multiplier=noise_multiplier, aggregation=aggregation,
            min_sites=secure_min_sites,
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
        server = {"config": str(cfg_path), "out-dir": str(run_dir)}
    run_config = write_toml(work / "run-config.toml", {
        **server, "sites": sites, "min-sites": min_sites, "round-timeout": float(round_timeout), "wait-timeout": 120.0})
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
    for line in notes:
        err.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)
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
        resumable = (run_dir / "checkpoint.json").is_file() and not (run_dir / "summary.json").is_file()
        err.print(f"interrupted: the SuperLink and the {sites} SuperNodes were stopped; {run_dir} is incomplete"
                  + (f" (continue it: dpfed flower-local --resume {run_dir})" if resumable else ""))
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
    from dpfed.cli.train import secure_rows

    eps, secure = summary["epsilon_target"], bool(summary.get("secure_aggregation"))
    rows = [
        ("privacy", summary["privacy"]),
        (f"ε target / spent (max over sites, {'RDP' if secure else 'PRV'} upper)",
         "—" if eps is None else f"{eps:g} / {summary['epsilon_spent']:.3f}"),
        ("δ (per record)", "—" if summary["delta"] is None else f"{summary['delta']:g}"),
        ("noise multiplier σ" + (" (equivalent, of the sum)" if secure else "") + " / clip C",
         "—" if summary["noise_multiplier"] is None else f"{summary['noise_multiplier']:g} / {summary['clip']:g}"),
        *secure_rows(summary),
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

