"""``dpfed plan``: epsilon for a noise multiplier, the noise multiplier for an epsilon, or
how many rounds fit a budget, before training.

Record-level DP per client (local DP-SGD with Poisson sampling, rate q = batch / n_i,
composed over all its steps); with several dataset sizes, every client is planned
and the worst one decides. The printed epsilon is the accountant's upper bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from accounting.sampling import sample_rate as poisson_rate
from dpfed.errors import ConfigError


ACCOUNTANTS = ("prv", "rdp")
FORMATS = ("table", "json")


def _parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            size = int(part)
        except ValueError:
            raise ConfigError(f"--dataset-sizes must be comma-separated integers >= 1, got {text!r}") from None
        if size < 1:
            raise ConfigError(f"--dataset-sizes must be comma-separated integers >= 1, got {text!r}")
        sizes.append(size)
    return sizes


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")


def _clients(sample_rate: float | None, batch_size: int | None, dataset_size: int | None,
             dataset_sizes: str | None) -> list[dict[str, Any]]:
    """One dict per client with its sample rate (and dataset size when known)."""
    if sample_rate is not None:
        if batch_size is not None or dataset_size is not None or dataset_sizes is not None:
            raise ConfigError("--sample-rate conflicts with --batch-size/--dataset-size/--dataset-sizes: give one way")
        if not (0 < sample_rate <= 1):
            raise ConfigError(f"--sample-rate must be in (0, 1], got {sample_rate!r}")
        return [{"client": "all", "sample_rate": sample_rate, "dataset_size": None}]
    if dataset_size is not None and dataset_sizes is not None:
        raise ConfigError("--dataset-size conflicts with --dataset-sizes: give one of them")
    if batch_size is None:
        raise ConfigError("the sample rate is missing: give --sample-rate, or --batch-size with --dataset-size(s)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if dataset_size is None and dataset_sizes is None:
        raise ConfigError("--batch-size needs --dataset-size or --dataset-sizes")
    sizes = [dataset_size] if dataset_size is not None else _parse_sizes(dataset_sizes or "")
    clients = []
    for index, size in enumerate(sizes):
        if size < 1:
            raise ConfigError(f"--dataset-size must be an integer >= 1, got {size!r}")
        if batch_size > size:
            raise ConfigError(f"--batch-size must be <= the dataset size, got {batch_size} > {size}")
        clients.append({"client": str(index) if len(sizes) > 1 else "all", "sample_rate": poisson_rate(batch_size, size),
                        "dataset_size": size})
    return clients


def _init_rates(clients: list[dict[str, Any]], sigma0: float | None, rate0: float | None, batch0: int | None) -> None:
    """Attach each client's DP-initialisation sampling rate q0 (only with --init-noise-multiplier)."""
    if sigma0 is None:
        if rate0 is not None or batch0 is not None:
            raise ConfigError("--init-sample-rate/--init-batch-size need --init-noise-multiplier")
        return
    if rate0 is not None and batch0 is not None:
        raise ConfigError("--init-sample-rate conflicts with --init-batch-size: give one of them")
    if rate0 is not None and not (0 < rate0 <= 1):
        raise ConfigError(f"--init-sample-rate must be in (0, 1], got {rate0!r}")
    if batch0 is not None:
        if batch0 < 1:
            raise ConfigError(f"--init-batch-size must be an integer >= 1, got {batch0!r}")
        if any(c["dataset_size"] is None for c in clients):
            raise ConfigError("--init-batch-size needs --dataset-size or --dataset-sizes (q0 = B0 / n)")
    for c in clients:
        c["init_sample_rate"] = (poisson_rate(batch0, c["dataset_size"]) if batch0 is not None
                                 else (rate0 if rate0 is not None else 1.0))


def _steps(steps: int | None, rounds: int | None, local_steps: int | None) -> tuple[int, int | None, int | None]:
    """Total steps T and, when given, (rounds, local steps)."""
    if steps is not None:
        if rounds is not None or local_steps is not None:
            raise ConfigError("--steps conflicts with --rounds/--local-steps: give T, or R and K with T = R*K")
        if steps < 1:
            raise ConfigError(f"--steps must be an integer >= 1, got {steps!r}")
        return steps, None, None
    if rounds is None or local_steps is None:
        raise ConfigError("the number of steps is missing: give --steps, or --rounds with --local-steps")
    if rounds < 1 or local_steps < 1:
        raise ConfigError(f"--rounds and --local-steps must be integers >= 1, got {rounds!r} and {local_steps!r}")
    return rounds * local_steps, rounds, local_steps


def _from_config(path: Path, **flags: Any) -> dict[str, Any]:
    """The plan's inputs from a run config, each one only where no flag gave it (``dpfed plan --config``)."""
    from dpfed import config as cfgmod
    from dpfed.setup import site_sizes

    if not path.is_file():
        raise ConfigError(f"--config must be an existing YAML file, got '{path}'")
    cfg = cfgmod.resolve_data_paths(cfgmod.load(path))
    p, t = cfg.privacy, cfg.train
    if not p.record_level:
        raise ConfigError(f"--config must describe a run with record-level DP to plan it, got privacy.unit "
                          f"{p.unit!r} (enabled: {p.enabled})")
    if p.aggregation == "secure":
        raise ConfigError("dpfed plan plans Gaussian DP-SGD; a privacy.aggregation 'secure' run calibrates Skellam "
                          "noise (dpfed train prints it before training), got privacy.aggregation 'secure'")
    out = dict(flags)
    if flags["noise_multiplier"] is None and flags["epsilon"] is None:
        if p.noise_multiplier is not None:
            out["noise_multiplier"] = p.noise_multiplier
        else:
            out["epsilon"] = p.epsilon
    elif flags["max_rounds"] and flags["epsilon"] is None:
        out["epsilon"] = p.epsilon
    if flags["delta"] is None:
        out["delta"] = p.delta
    rate_given = any(flags[k] is not None for k in ("sample_rate", "dataset_size", "dataset_sizes"))
    if flags["batch_size"] is None and flags["sample_rate"] is None:
        out["batch_size"] = t.batch_size
    if not rate_given:
        out["dataset_sizes"] = ",".join(str(n) for n in site_sizes(cfg))
    if flags["steps"] is None and flags["rounds"] is None and flags["local_steps"] is None:
        out["local_steps"] = t.local_steps
        if not flags["max_rounds"]:
            out["rounds"] = t.rounds
    if cfg.init.strategy == "dp" and flags["init_noise_multiplier"] is None:
        out["init_noise_multiplier"] = cfg.init.dp_noise_multiplier
        if flags["init_sample_rate"] is None and flags["init_batch_size"] is None:
            out["init_batch_size"] = cfg.init.dp_batch_size
    return out


def plan(
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Plan the run this YAML config describes (its sites' sizes from its data and split, "
                               "batch, rounds, local steps, epsilon or sigma, delta, DP init); flags override it.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(
        "--noise-multiplier", help="Noise multiplier sigma (noise std / clip). Forward mode: print epsilon.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(
        "--epsilon", help="Target epsilon. Inverse mode: print the smallest sigma (3 s.f.) whose upper bound fits.")] = None,
    delta: Annotated[Optional[float], typer.Option(
        "--delta", help="Target delta, in (0, 1); below 1/min(dataset size) when sizes are given.")] = None,
    sample_rate: Annotated[Optional[float], typer.Option(
        "--sample-rate", help="Poisson sampling rate q per step, in (0, 1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Expected batch size B; with --dataset-size(s), q = B / n.")] = None,
    dataset_size: Annotated[Optional[int], typer.Option(
        "--dataset-size", help="Records n of the (one) client; q = B / n.")] = None,
    dataset_sizes: Annotated[Optional[str], typer.Option(
        "--dataset-sizes", help="Comma-separated records per client, n1,n2,...; reports each client and the worst.")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Total DP-SGD steps T per client.")] = None,
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", help="Federated rounds R each client takes part in; T = R * local steps.")] = None,
    local_steps: Annotated[Optional[int], typer.Option(
        "--local-steps", help="Local DP-SGD steps K per round.")] = None,
    max_rounds: Annotated[bool, typer.Option(
        "--max-rounds", help="Print how many rounds fit: needs --noise-multiplier, --epsilon, --local-steps and q.")] = False,
    init_noise_multiplier: Annotated[Optional[float], typer.Option(
        "--init-noise-multiplier", help="Add one Gaussian release with this sigma (init: dp) to every client.")] = None,
    init_sample_rate: Annotated[Optional[float], typer.Option(
        "--init-sample-rate", help="Poisson rate of the DP initialisation's release, in (0, 1] (default 1: all records).")] = None,
    init_batch_size: Annotated[Optional[int], typer.Option(
        "--init-batch-size", help="Expected sample of the DP initialisation (init.dp_batch_size); q0 = B0 / n per client.")] = None,
    accountant: Annotated[str, typer.Option(
        "--accountant", help="prv (tight numerical bound, default) or rdp (looser, cheap).")] = "prv",
    output_format: Annotated[str, typer.Option(
        "--format", help="table (human) or json (machine).")] = "table",
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG with epsilon against rounds and sigma against target epsilon.")] = None,
) -> None:
    """Plan a private run: epsilon for sigma, sigma for epsilon, or rounds for a budget."""
    from accounting import planning, rdp
    from accounting.events import PoissonGaussianEvent

    if config is not None:
        given = _from_config(config, noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta,
                             sample_rate=sample_rate, batch_size=batch_size, dataset_size=dataset_size,
                             dataset_sizes=dataset_sizes, steps=steps, rounds=rounds, local_steps=local_steps,
                             max_rounds=max_rounds, init_noise_multiplier=init_noise_multiplier,
                             init_sample_rate=init_sample_rate, init_batch_size=init_batch_size)
        noise_multiplier, epsilon, delta = given["noise_multiplier"], given["epsilon"], given["delta"]
        batch_size, dataset_sizes = given["batch_size"], given["dataset_sizes"]
        rounds, local_steps = given["rounds"], given["local_steps"]
        init_noise_multiplier, init_batch_size = given["init_noise_multiplier"], given["init_batch_size"]
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if output_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if delta is None:
        raise ConfigError("--delta is required")
    if not (0 < delta < 1):
        raise ConfigError(f"--delta must be in (0, 1), got {delta!r}")
    for name, value in (("--noise-multiplier", noise_multiplier), ("--epsilon", epsilon),
                        ("--init-noise-multiplier", init_noise_multiplier)):
        _positive(name, value)
    if epsilon is not None and (problem := planning.epsilon_range_problem(epsilon)) is not None:
        raise ConfigError(f"--epsilon {problem}, got {epsilon!r}")
    clients = _clients(sample_rate, batch_size, dataset_size, dataset_sizes)
    _init_rates(clients, init_noise_multiplier, init_sample_rate, init_batch_size)
    sizes = [c["dataset_size"] for c in clients if c["dataset_size"] is not None]
    if sizes and delta >= 1 / min(sizes):
        raise ConfigError(f"--delta must be < 1/min(dataset size) = {1 / min(sizes):.3g}, got {delta!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must be a .png path, got {str(plot)!r}")
    if plot is not None and not plot.parent.is_dir():
        raise ConfigError(f"--plot directory must exist, got {str(plot.parent)!r}")

    if max_rounds:
        mode = "max_rounds"
        if noise_multiplier is None or epsilon is None:
            raise ConfigError("--max-rounds needs both --noise-multiplier and --epsilon")
        if steps is not None or rounds is not None:
            raise ConfigError("--max-rounds conflicts with --steps/--rounds: it computes the rounds; give --local-steps")
        if local_steps is None or local_steps < 1:
            raise ConfigError(f"--max-rounds needs --local-steps >= 1, got {local_steps!r}")
    elif noise_multiplier is not None and epsilon is not None:
        raise ConfigError("--noise-multiplier conflicts with --epsilon: give one (or add --max-rounds)")
    elif noise_multiplier is None and epsilon is None:
        raise ConfigError("give --noise-multiplier (to get epsilon) or --epsilon (to get sigma)")
    else:
        mode = "forward" if noise_multiplier is not None else "inverse"
        total_steps, rounds, local_steps = _steps(steps, rounds, local_steps)

    def fixed_for(client: dict[str, Any]) -> list:
        if init_noise_multiplier is None:
            return []
        return [PoissonGaussianEvent(noise_multiplier=init_noise_multiplier, sample_rate=client["init_sample_rate"], count=1)]

    acc = accountant
    groups: dict[tuple, dict[str, Any]] = {}  # clients with the same (q, q0) share one plan
    for client in clients:
        groups.setdefault((client["sample_rate"], client.get("init_sample_rate")), client)
    result: dict[str, Any] = {"mode": mode, "accountant": acc, "delta": delta, "unit": "record",
                              "init_noise_multiplier": init_noise_multiplier}

    if mode == "inverse":
        sigma = planning.calibrate_sites(  # the calibration training runs (dpfed.setup.calibrate)
            target_epsilon=epsilon, delta=delta, accountant=acc,
            sites=[planning.SitePlan(sample_rate=c["sample_rate"], steps=total_steps, fixed_events=tuple(fixed_for(c)))
                   for c in clients])
        result["target_epsilon"] = epsilon
    elif mode == "max_rounds":
        sigma = noise_multiplier
        fitted = min(planning.max_rounds(noise_multiplier=sigma, target_epsilon=epsilon, delta=delta,
                                         sample_rate=rate, steps_per_round=local_steps,
                                         fixed_events=fixed_for(c), accountant=acc)
                     for (rate, _), c in groups.items())
        rounds, total_steps = fitted, fitted * local_steps
        result["target_epsilon"] = epsilon
        result["max_rounds"] = fitted
    else:
        sigma = noise_multiplier

    def events_for(client: dict[str, Any]) -> list:
        rate = client["sample_rate"]
        planned = [PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=rate, count=total_steps)] if total_steps else []
        return planned + fixed_for(client)

    seen: dict[tuple, tuple[Any, float]] = {}
    for client in clients:
        key = (client["sample_rate"], client.get("init_sample_rate"))
        if key not in seen:
            events = events_for(client)
            seen[key] = (*planning.bound_and_source(events, delta=delta, accountant=acc), rdp.epsilon(events, delta=delta))
        bound, source, eps_rdp = seen[key]
        client.update(_bound_fields(bound, eps_rdp, source))
    worst = max(clients, key=lambda c: c["epsilon"])
    result.update({
        "epsilon": worst["epsilon"], "epsilon_lower": worst["epsilon_lower"],
        "epsilon_estimate": worst["epsilon_estimate"], "epsilon_rdp": worst["epsilon_rdp"],
        "epsilon_accountant": worst["epsilon_accountant"],
        "noise_multiplier": sigma, "sample_rate": worst["sample_rate"], "steps": total_steps,
        "rounds": rounds, "local_steps": local_steps, "worst_client": worst["client"],
        "init_sample_rate": worst.get("init_sample_rate"), "clients": clients,
    })
    if plot is not None:
        _plot(plot, sigma=sigma, delta=delta, rate=worst["sample_rate"], total_steps=total_steps,
              rounds=rounds, local_steps=local_steps, fixed=fixed_for(worst), accountant=acc, target=epsilon)
        result["plot"] = str(plot)
    _print(result, output_format)


def _bound_fields(bound: Any, eps_rdp: float, source: str) -> dict[str, Any]:
    """``source``: the accountant that produced ``bound`` ("rdp" also when PRV fell back to it)."""
    return {
        "epsilon": bound.upper,
        "epsilon_lower": bound.lower if source == "prv" else None,
        "epsilon_estimate": bound.estimate,
        "epsilon_rdp": eps_rdp,
        "epsilon_accountant": source,
    }


def _plot(path: Path, *, sigma: float, delta: float, rate: float, total_steps: int, rounds: int | None,
          local_steps: int | None, fixed: list, accountant: str, target: float | None) -> None:
    """Two panels: epsilon against rounds (at sigma), sigma against target epsilon (at T)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from accounting import planning

    if rounds:
        per_round, horizon, xlabel = local_steps or 1, max(rounds, 1), "rounds"
    else:
        per_round, horizon, xlabel = 1, max(total_steps, 1), "steps"
    if not total_steps:  # max-rounds found 0: show the first few rounds
        per_round, horizon, xlabel = local_steps or 1, 10, "rounds"
    curve = planning.epsilon_curve(noise_multiplier=sigma, delta=delta, sample_rate=rate, steps_per_round=per_round,
                                   rounds=horizon, fixed_events=fixed, accountant=accountant, points=20)
    sigmas = [sigma * f for f in (0.6, 0.75, 0.9, 1.0, 1.2, 1.5, 2.0)]
    trade = planning.epsilon_by_noise(noise_multipliers=sigmas, delta=delta, sample_rate=rate,
                                      steps=max(total_steps, per_round), fixed_events=fixed, accountant=accountant)
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot([r for r, _ in curve], [b.upper for _, b in curve], marker="o", ms=3, label=f"{accountant} upper")
    if target is not None:
        left.axhline(target, color="grey", ls="--", label="target epsilon")
    left.set(xlabel=xlabel, ylabel="epsilon", title=f"epsilon against {xlabel} (sigma={sigma:g}, q={rate:.3g})")
    left.legend()
    right.plot([b.upper for _, b in trade], [s for s, _ in trade], marker="o", ms=3)
    right.set(xlabel="target epsilon", ylabel="noise multiplier sigma",
              title=f"sigma against target epsilon (T={max(total_steps, per_round)}, delta={delta:g})")
    FigureCanvasAgg(figure).print_png(str(path))


def _print(result: dict[str, Any], output_format: str) -> None:
    if output_format == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    titles = {"forward": "epsilon for a noise multiplier", "inverse": "noise multiplier for a target epsilon",
              "max_rounds": "rounds that fit a target epsilon"}
    table = Table(title=f"dpfed plan: {titles[result['mode']]}", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    if result["mode"] == "max_rounds":
        table.add_row("max rounds", str(result["max_rounds"]))
    table.add_row("noise multiplier", f"{result['noise_multiplier']:g}")
    if "target_epsilon" in result:
        table.add_row("target epsilon", f"{result['target_epsilon']:g}")
    used = result["epsilon_accountant"]
    table.add_row(f"epsilon ({used} upper)", f"{result['epsilon']:.4f}")
    if used != result["accountant"]:
        table.add_row("accountant", f"{used.upper()}: prv-accountant cannot compose these parameters, so the "
                      f"(looser, still valid) {used.upper()} upper bound is shown")
    if result["epsilon_lower"] is not None:
        table.add_row("epsilon lower / estimate", f"{result['epsilon_lower']:.4f} / {result['epsilon_estimate']:.4f}")
    table.add_row("epsilon (RDP)", f"{result['epsilon_rdp']:.4f}")
    table.add_row("delta", f"{result['delta']:g}")
    table.add_row("sample rate (worst client)", f"{result['sample_rate']:.6g}")
    steps = f"{result['steps']}"
    if result["rounds"] is not None:
        steps += f" = {result['rounds']} rounds x {result['local_steps']} local steps"
    table.add_row("steps", steps)
    if result["init_noise_multiplier"] is not None:
        table.add_row("DP initialisation", f"sigma {result['init_noise_multiplier']:g}, "
                      f"sample rate {result['init_sample_rate']:.6g} (worst client), one release")
    table.add_row("privacy unit", "record (per client, add/remove one record)")
    if "plot" in result:
        table.add_row("plot", result["plot"])
    console.print(table)
    if len(result["clients"]) > 1:
        clients = Table(title="per client")
        for column in ("client", "dataset size", "sample rate", "epsilon (upper)", "epsilon (RDP)"):
            clients.add_column(column)
        for c in result["clients"]:
            marker = " (worst)" if c["client"] == result["worst_client"] else ""
            source = "" if c["epsilon_accountant"] == result["accountant"] else f" ({c['epsilon_accountant'].upper()})"
            clients.add_row(c["client"] + marker, str(c["dataset_size"]), f"{c['sample_rate']:.6g}",
                            f"{c['epsilon']:.4f}{source}", f"{c['epsilon_rdp']:.4f}")
        console.print(clients)
