"""``dpfed budget RUN_DIR``: what each client has spent and what is left.

Reads ``RUN_DIR/ledger.jsonl`` (verified line by line, never modified) and
``RUN_DIR/budget.json`` (``{"epsilon": E, "delta": D, "accountant": "prv",
"privacy_unit": "record"}``) and derives every client's epsilon from its events.
A run with client-level DP also has ``server_ledger.jsonl`` and a ``"client_level":
{"epsilon": E_c or null, "delta": D_c}`` entry; a client-level-only run has no record-level keys.

Before reporting anything, the ledgers are checked against the rest of the run directory
(:func:`dpfed.rundir_check.verify_run_ledgers`: checkpoint heads, run.json, summary.json);
``--ledger-key FILE`` also verifies the MAC of every line of a keyed ledger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from accounting.ledger import Ledger, load_key
from dpfed.errors import ConfigError
from dpfed.rundir_check import verify_run_ledgers

LEDGER_NAME = "ledger.jsonl"
SERVER_LEDGER_NAME = "server_ledger.jsonl"
BUDGET_NAME = "budget.json"


FORMATS = ("table", "json")


def _check_epsilon(path: Path, name: str, epsilon: Any, *, optional: bool = False) -> float | None:
    if optional and epsilon is None:
        return None
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(f"{path}: {name} must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_delta(path: Path, name: str, delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise ConfigError(f"{path}: {name} must be a number in (0, 1), got {delta!r}")
    return float(delta)


def read_budget(path: Path) -> dict[str, Any]:
    """Load and validate budget.json; raise ConfigError naming the field otherwise.

    Returns ``epsilon``/``delta`` (None for a client-level-only run), ``accountant``,
    ``privacy_unit`` and ``client_level`` (None or ``{"epsilon": float | None, "delta": float}``).
    """
    from dpfed.jsonio import read_json_object

    data = read_json_object(path, what="budget file")
    accountant = data.get("accountant", "prv")
    if accountant not in ("prv", "rdp"):
        raise ConfigError(f"{path}: accountant must be prv or rdp, got {accountant!r}")
    client_level = data.get("client_level")
    if client_level is not None:
        if not isinstance(client_level, dict):
            raise ConfigError(f"{path}: client_level must be an object, got {client_level!r}")
        client_level = {"epsilon": _check_epsilon(path, "client_level.epsilon", client_level.get("epsilon"), optional=True),
                        "delta": _check_delta(path, "client_level.delta", client_level.get("delta"))}
    record_level = client_level is None or "epsilon" in data or "delta" in data
    epsilon = _check_epsilon(path, "epsilon", data.get("epsilon")) if record_level else None
    delta = _check_delta(path, "delta", data.get("delta")) if record_level else None
    unit = data.get("privacy_unit", "record")
    if unit not in ("record", "client"):
        raise ConfigError(f"{path}: privacy_unit must be record or client, got {unit!r}")
    return {"epsilon": epsilon, "delta": delta, "accountant": accountant, "privacy_unit": unit,
            "client_level": client_level}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    start = previous = None
    for value in values:
        if start is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ", ".join(parts)


def budget(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding ledger.jsonl and budget.json.")],
    output_format: Annotated[str, typer.Option("--format", help="table (human) or json (machine).")] = "table",
    ledger_key: Annotated[Optional[Path], typer.Option(
        "--ledger-key", help="key file of a keyed ledger (hex, mode 0600): verify every line's MAC too.")] = None,
) -> None:
    """Per client: epsilon spent (upper bound, plus lower/estimate), epsilon remaining, rounds taken part in."""
    if output_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR must be a directory, got {str(run_dir)!r}")
    key = load_key(ledger_key) if ledger_key is not None else None
    config = read_budget(run_dir / BUDGET_NAME)
    verified = verify_run_ledgers(run_dir, key=key)  # never creates a ledger; one-line error on any mismatch
    result: dict[str, Any] = {"run_dir": str(run_dir), "accountant": config["accountant"]}
    rows: list[dict[str, Any]] = []
    if config["epsilon"] is not None:
        if verified.ledger is None:
            raise ConfigError(f"{run_dir / LEDGER_NAME}: ledger not found (budget.json declares record-level DP)")
        rows = _record_rows(verified.ledger, config)
        result.update({
            "epsilon_budget": config["epsilon"],
            "delta": config["delta"],
            "privacy_unit": config["privacy_unit"],
            "max_epsilon": max((row["epsilon"] for row in rows), default=0.0),
            "clients": rows,
        })
    client = None
    if config["client_level"]:
        if verified.server_ledger is None:
            raise ConfigError(f"{run_dir / SERVER_LEDGER_NAME}: server ledger not found (budget.json declares "
                              f"client-level DP)")
        client = _client_level(verified.server_ledger, config)
    result["client_level"] = client
    result["ledger_checks"] = verified.checks
    if output_format == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if config["epsilon"] is not None:
        table = Table(title=(f"privacy budget: epsilon {config['epsilon']:g}, delta {config['delta']:g}, "
                             f"{config['accountant']}, unit {config['privacy_unit']}"))
        for column in ("client", "epsilon spent (upper)", "lower / estimate", "remaining", "rounds", "events"):
            table.add_column(column)
        for row in rows:
            lower = "-" if row["epsilon_lower"] is None else f"{row['epsilon_lower']:.4f}"
            remaining = f"{row['remaining']:.4f}" + (" EXCEEDED" if row["exceeded"] else "")
            table.add_row(row["client"], f"{row['epsilon']:.4f}", f"{lower} / {row['epsilon_estimate']:.4f}",
                          remaining, f"{row['num_rounds']} ({_ranges(row['rounds'])})", str(row["events"]))
        if not rows:
            table.add_row("(no events recorded)", "0", "-", f"{config['epsilon']:.4f}", "0", "0")
        console.print(table)
    if client is not None:
        target = "none set" if client["epsilon_budget"] is None else f"{client['epsilon_budget']:g}"
        table = Table(title=(f"client-level DP (whole sites; {client['trust']}): budget {target}, "
                             f"delta {client['delta']:g}, {config['accountant']}"))
        for column in ("account", "epsilon spent (upper)", "lower / estimate", "remaining", "rounds released"):
            table.add_column(column)
        remaining = "-" if client["remaining"] is None else (
            f"{client['remaining']:.4f}" + (" EXCEEDED" if client["exceeded"] else ""))
        lower = "-" if client["epsilon_lower"] is None else f"{client['epsilon_lower']:.4f}"
        table.add_row(client["account"], f"{client['epsilon']:.4f}", f"{lower} / {client['epsilon_estimate']:.4f}",
                      remaining, f"{client['num_rounds']} ({_ranges(client['rounds'])})")
        console.print(table)
    for line in verified.checks:
        console.print(f"checked: {line}", style="dim", highlight=False)


def _record_rows(ledger: Ledger, config: dict[str, Any]) -> list[dict[str, Any]]:
    from accounting.planning import bound

    ledger_path = ledger.path
    rows = []
    for client in ledger.clients():
        events = ledger.events(client)
        units = {event.unit for event in events}
        if units != {config["privacy_unit"]}:
            raise ConfigError(
                f"{ledger_path}: client {client!r} has events with unit {sorted(units)}, "
                f"but budget.json privacy_unit is {config['privacy_unit']!r}"
            )
        spent = bound(events, delta=config["delta"], accountant=config["accountant"])
        rounds = sorted(ledger.rounds_completed(client))
        rows.append({
            "client": client,
            "epsilon": spent.upper,
            "epsilon_lower": spent.lower if config["accountant"] == "prv" else None,
            "epsilon_estimate": spent.estimate,
            "remaining": config["epsilon"] - spent.upper,
            "exceeded": spent.upper > config["epsilon"],
            "rounds": rounds,
            "num_rounds": len(rounds),
            "events": len(events),
        })
    return rows


def _client_level(ledger: Ledger, config: dict[str, Any]) -> dict[str, Any]:
    """The server ledger's one account: the client-level (whole-site) guarantee."""
    from accounting.planning import bound

    ledger_path = ledger.path
    accounts = ledger.clients()
    if len(accounts) > 1:
        raise ConfigError(f"{ledger_path}: a server ledger must hold one account, got {sorted(accounts)}")
    account = accounts[0] if accounts else "all-clients"
    events = ledger.events(account) if accounts else []
    units = {event.unit for event in events}
    if units - {"client"}:
        raise ConfigError(f"{ledger_path}: server ledger events must have unit 'client', got {sorted(units)}")
    level = config["client_level"]
    spent = bound(events, delta=level["delta"], accountant=config["accountant"]) if events else None
    eps = spent.upper if spent else 0.0
    rounds = sorted(ledger.rounds_completed(account)) if accounts else []
    return {
        "account": account,
        "epsilon": eps,
        "epsilon_lower": (spent.lower if spent and config["accountant"] == "prv" else (0.0 if not spent else None)),
        "epsilon_estimate": spent.estimate if spent else 0.0,
        "epsilon_budget": level["epsilon"],
        "delta": level["delta"],
        "remaining": None if level["epsilon"] is None else level["epsilon"] - eps,
        "exceeded": level["epsilon"] is not None and eps > level["epsilon"],
        "rounds": rounds,
        "num_rounds": len(rounds),
        "trust": "requires a trusted aggregator",
    }
