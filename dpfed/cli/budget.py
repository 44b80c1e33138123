"""``dpfed budget RUN_DIR``: what each client has spent and what is left.

Reads ``RUN_DIR/ledger.jsonl`` (verified line by line, never modified) and
``RUN_DIR/budget.json`` (``{"epsilon": E, "delta": D, "accountant": "prv",
"privacy_unit": "record"}``) and derives every client's epsilon from its events.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from dpfed.errors import ConfigError

LEDGER_NAME = "ledger.jsonl"
BUDGET_NAME = "budget.json"


FORMATS = ("table", "json")


def read_budget(path: Path) -> dict[str, Any]:
    """Load and validate budget.json; raise ConfigError naming the field otherwise."""
    from dpfed.jsonio import read_json_object

    data = read_json_object(path, what="budget file")
    epsilon, delta = data.get("epsilon"), data.get("delta")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(f"{path}: epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise ConfigError(f"{path}: delta must be a number in (0, 1), got {delta!r}")
    accountant = data.get("accountant", "prv")
    if accountant not in ("prv", "rdp"):
        raise ConfigError(f"{path}: accountant must be prv or rdp, got {accountant!r}")
    unit = data.get("privacy_unit", "record")
    if unit not in ("record", "client"):
        raise ConfigError(f"{path}: privacy_unit must be record or client, got {unit!r}")
    return {"epsilon": float(epsilon), "delta": float(delta), "accountant": accountant, "privacy_unit": unit}


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
) -> None:
    """Per client: epsilon spent (upper bound, plus lower/estimate), epsilon remaining, rounds taken part in."""
    from accounting.ledger import Ledger
    from accounting.planning import bound

    if output_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR must be a directory, got {str(run_dir)!r}")
    config = read_budget(run_dir / BUDGET_NAME)
    ledger_path = run_dir / LEDGER_NAME
    if not ledger_path.is_file():
        raise ConfigError(f"{ledger_path}: ledger not found")
    ledger = Ledger(ledger_path)  # verifies every line; raises LedgerCorruptError
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
    result = {
        "run_dir": str(run_dir),
        "epsilon_budget": config["epsilon"],
        "delta": config["delta"],
        "accountant": config["accountant"],
        "privacy_unit": config["privacy_unit"],
        "max_epsilon": max((row["epsilon"] for row in rows), default=0.0),
        "clients": rows,
    }
    if output_format == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
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
