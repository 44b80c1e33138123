"""``dpfed train``: federated rounds of DP fine-tuning (Fed-SB), in process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpfed import config as cfgmod
from dpfed.cli import options
from dpfed.errors import ConfigError

RESUME_FLAGS = ("--resume", "--device", "--format", "--ledger-key")  # the only options --resume accepts


def train(
    ctx: typer.Context,
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
    print_config: Annotated[bool, typer.Option("--print-config", help="print the resolved config (YAML) and exit")] = False,
    clients: options.Clients = None,
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
    method: options.Method = None,
    init: options.Init = None,
    device: options.Device = None,
    seed: options.Seed = None,
    privacy_unit: options.PrivacyUnit = None,
    client_clip: options.ClientClip = None,
    client_noise_multiplier: options.ClientNoiseMultiplier = None,
    client_epsilon: options.ClientEpsilon = None,
    client_delta: options.ClientDelta = None,
    aggregation: options.Aggregation = None,
    min_sites: options.MinSites = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue RUN_DIR from its last checkpoint and ledger (other options except --device/--format/--ledger-key are refused)")] = None,
    ledger_key: Annotated[Optional[Path], typer.Option(help="HMAC key file for the ledger (created mode 0600 if missing; keep it outside the run directory): edits by anyone without it are detected")] = None,
    canaries: options.Canaries = None,
    canary_kind: options.CanaryKind = None,
    no_dp: options.NoDp = False,
    out: options.Out = None,
    fmt: options.Format = "table",
) -> None:
    """Fine-tune with Fed-SB across simulated sites under per-client record-level DP."""
    from rich.console import Console

    from dpfed.runner import claim_run_dir, release_claim

    if fmt not in ("table", "json"):
        raise ConfigError(f"format must be 'table' or 'json', got {fmt!r}")
    if resume is not None:
        refused = [flag for flag in options.given(ctx) if flag not in RESUME_FLAGS]
        if refused:
            raise ConfigError(f"--resume continues a run with its recorded config; got other options: {', '.join(refused)}")
        _resume(resume, device=device, fmt=fmt, key=_ledger_key(ledger_key, create=False))
        return
    cfg, notes = options.run_config(
        options.base_config(config), epsilon=epsilon, delta=delta, model=model, task=task, dataset=dataset,
        text_column=text_column, label_column=label_column, prompt_column=prompt_column,
        response_column=response_column, template=template, labels=labels, public_data=public_data,
        public_fraction=public_fraction, drop_invalid=drop_invalid, clients=clients, partition=partition,
        dirichlet_alpha=dirichlet_alpha, canaries=canaries, canary_kind=canary_kind, rounds=rounds,
        local_steps=local_steps, batch_size=batch_size, lr=lr, rank=rank, target_modules=target_modules,
        client_fraction=client_fraction, method=method, init=init, device=device, seed=seed, clip=clip,
        noise_multiplier=noise_multiplier, no_dp=no_dp, privacy_unit=privacy_unit, client_clip=client_clip,
        client_noise_multiplier=client_noise_multiplier, client_epsilon=client_epsilon, client_delta=client_delta,
        aggregation=aggregation, min_sites=min_sites,
    )
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

    from attacks.plan import audit_plan
    from dpfed.runner import prepare, run

    err = Console(stderr=True)
    quiet = fmt == "json"
    if not cfg.privacy.enabled:
        err.print("[bold red]--no-dp: training WITHOUT differential privacy; no privacy guarantee holds.[/]")

    def on_setup(kind: str, info: dict) -> None:
        if kind == "data":
            notes.extend(info["notes"])

    with err.status("preparing data, model and adapter...", spinner="dots") if not quiet else _Null():
        job = prepare(cfg, progress=on_setup, audit=audit_plan(cfg))  # the CLI composes the audit: core never imports attacks
    # printed once everything is validated, so that a refused run prints its one error line only
    for line in notes:
        err.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)
    if "head_source" in job.init_info:
        err.print(f"classification head: {job.init_info['head_source']}", markup=False, highlight=False, soft_wrap=True)
    if not quiet and job.secure is not None and job.dp:
        err.print(f"secure aggregation: Skellam μ = {job.secure.mu_total:.6g} in the sum (σ-equivalent "
                  f"{job.noise_multiplier:.4g}), μ/site = {job.secure.mu_site:.6g} for {job.secure.min_sites} sites, "
                  f"{job.secure.bits} bits, for ε = {cfg.privacy.epsilon:g}, δ = {cfg.privacy.delta:g} over "
                  f"{cfg.train.rounds} rounds (worst client)")
    elif not quiet and job.noise_multiplier is not None:
        err.print(f"noise multiplier σ = {job.noise_multiplier:g} for ε = {cfg.privacy.epsilon:g}, δ = {cfg.privacy.delta:g} "
                  f"over {cfg.train.rounds} rounds × {cfg.train.local_steps} local steps (worst client)")
    return run(job, run_dir, progress=_progress(err, cfg, quiet), ledger_key=key, claimed=created)


def _resume(run_dir: Path, *, device: Optional[str], fmt: str, key: Optional[bytes]) -> None:
    from rich.console import Console

    from attacks.plan import audit_plan
    from dpfed.runner import resume

    if not run_dir.is_dir():
        raise ConfigError(f"--resume must name an existing run directory, got '{run_dir}'")
    err = Console(stderr=True)
    quiet = fmt == "json"
    cfg = cfgmod.load(run_dir / "config.yaml")
    summary = resume(run_dir, device=device, progress=_progress(err, cfg, quiet), ledger_key=key, audit=audit_plan)
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


def secure_rows(summary: dict) -> list[tuple[str, str]]:
    """The rows of secure aggregation (distributed DP): the two ε and the noise, only for such runs."""
    sa = summary.get("secure_aggregation")
    if not sa:
        return []
    eps, coll = summary.get("epsilon_spent"), summary.get("epsilon_colluding_server")
    return [
        ("aggregation", f"secure (Skellam shares; min {sa['min_sites']} sites, {sa['bits']} bits)"),
        ("ε against everyone who sees only the sum (RDP upper)", "—" if eps is None else f"{eps:.3f}"),
        ("ε if secure aggregation were broken (colluding server)", "—" if coll is None else f"{coll:.3f}"),
        ("Skellam μ of the sum / per site", f"{sa['mu_total']:.6g} / {sa['mu_site']:.6g}"),
        ("rounds discarded (fewer than min sites)", str(len(summary.get("rounds_discarded") or []))),
    ]


def _print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"dpfed train — {summary['method']}", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("privacy", summary["privacy"]),
        (f"ε target / spent (max over clients, {'RDP' if summary.get('secure_aggregation') else 'PRV'} upper)",
         "—" if summary["epsilon_target"] is None else f"{summary['epsilon_target']:g} / {summary['epsilon_spent']:.3f}"),
        ("δ (per record)", "—" if summary["delta"] is None else f"{summary['delta']:g}"),
        ("noise multiplier σ" + (" (equivalent, of the sum)" if summary.get("secure_aggregation") else "") + " / clip C",
         "—" if summary["noise_multiplier"] is None else f"{summary['noise_multiplier']:g} / {summary['clip']:g}"),
        *secure_rows(summary),
        ("client-level ε / δ (DP-FedAvg; trusted server)",
         "—" if not summary.get("client_level") else
         f"{summary['client_level']['epsilon']:.3f} / {summary['client_level']['delta']:g} "
         f"(σ_c {summary['client_level']['noise_multiplier']:g}, S {summary['client_level']['clip']:g})"),
        ("rounds completed", f"{summary['rounds_completed']} / {summary['rounds_planned']}"
         + ("" if summary.get("stop_reason") in (None, "completed") else f" (stopped: {summary['stop_reason']})")),
        ("clients (per round)", f"{summary['clients']} ({summary['clients_per_round']})"),
        ("test accuracy" if summary["accuracy"] is not None else "eval loss",
         f"{summary['accuracy']:.4f}" if summary["accuracy"] is not None else f"{summary['eval_loss']:.4f}"),
        (("accuracy before federated training", f"{summary['initial_eval']['accuracy']:.4f}")
         if (summary.get("initial_eval") or {}).get("accuracy") is not None else
         ("eval loss before federated training",
          f"{summary['initial_eval']['eval_loss']:.4f}" if (summary.get("initial_eval") or {}).get("eval_loss") is not None
          else "—")),
        ("bytes up / down per client per round", f"{summary['bytes_up_per_client_round']} / {summary['bytes_down_per_client_round']}"),
        ("trainable parameters", str(summary["trainable_params"])),
        ("wall time (training) / setup", f"{summary['wall_seconds']:.0f} s / {summary['setup_seconds']:.0f} s"),
        ("device", summary["device"]),
        ("run directory", str(run_dir)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
