"""``dpfed audit RUN_DIR``: one-run privacy audit of a finished run; writes audit.json, audit.md, audit.html.

Exit codes: 0 when the run is consistent with its claim or claims nothing (``--no-dp``), 3 when
the audit's epsilon lower bound exceeds the claimed epsilon, 2 for a missing or corrupt run
directory, ledgers that disagree with the run directory (checked first, see
:mod:`dpfed.rundir_check`; ``--ledger-key`` also verifies a keyed ledger's MACs) or a bad option.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from accounting.ledger import load_key
from dpfed.errors import ConfigError, DataError

EXIT_VIOLATION = 3
FORMATS = ("table", "json")


def audit(
    run_dir: Annotated[Path, typer.Argument(help="run directory of `dpfed train` (with canaries.json)")],
    out: Annotated[Optional[Path], typer.Option(help="folder for audit.json, audit.md, audit.html (default: RUN_DIR)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
    confidence: Annotated[float, typer.Option(help="confidence level of the epsilon lower bound, in (0, 1)")] = 0.95,
    k_fraction: Annotated[float, typer.Option(help="guesses per side as a fraction of the canaries, in (0, 0.5]; fix it before auditing")] = 0.1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
    ledger_key: Annotated[Optional[Path], typer.Option(
        "--ledger-key", help="key file of a keyed ledger (hex, mode 0600): verify every line's MAC too")] = None,
) -> None:
    """Audit a run's privacy claim with its canaries (one-run audit) and membership attacks on real records."""
    from attacks.audit import audit_run
    from attacks.report import to_jsonable, write_reports

    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if out is not None:
        _check_out(out)  # before the audit's minutes of work
    key = load_key(ledger_key) if ledger_key is not None else None
    result = audit_run(run_dir, confidence=confidence, k_fraction=k_fraction, device=device, ledger_key=key)
    target = out if out is not None else run_dir
    try:
        paths = write_reports(result, target)
    except OSError as exc:
        raise DataError(f"--out '{target}' could not be written ({type(exc).__name__}: {exc.strerror or exc})") from None
    if fmt == "json":
        typer.echo(json.dumps(to_jsonable(result), indent=2))
    else:
        _print_table(result, paths)
    if result["verdict"] == "violation":
        raise typer.Exit(EXIT_VIOLATION)


def _check_out(out: Path) -> None:
    """``--out`` must be a directory, or a path whose nearest existing parent is a writable directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a directory (for audit.json, audit.md, audit.html), got '{out}', "
                          f"an existing file")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out must be a directory, got '{out}' inside '{parent}', which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out must be writable, got '{out}' ({'it' if parent == out else repr(str(parent))} "
                          f"is not writable by this user)")


def _print_table(r: dict, paths: dict[str, Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x, d: int = 3) -> str:
        return "—" if x is None else f"{x:.{d}f}"

    colour = {"consistent": "green", "violation": "bold red", "no-claim": "yellow"}[r["verdict"]]
    t = Table(title=f"dpfed audit — [{colour}]{r['verdict']}[/]", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("ε claimed (δ)", "none (--no-dp)" if r["epsilon_claimed"] is None else f"{r['epsilon_claimed']:.3f} ({r['delta']:g})"),
        (f"ε lower bound ({r['confidence']:.0%})", f(r["epsilon_lower_bound"])),
        ("ceiling of this audit", f(r["epsilon_lower_bound_ceiling"])),
        ("canaries / guesses / correct", f"{r['canaries']} / {r['guesses']} / {r['correct']}"),
        (f"AUC ({r['headline_attack'] or '—'})", f(r["auc"])),
        ("TPR at 1% / 0.1% FPR", f"{f(r['tpr_at_1pct_fpr'])} / {f(r['tpr_at_0_1pct_fpr'])}"),
        ("μ-GDP estimate (→ ε)", f"{f(r['gdp_mu'])} (→ {f(r['gdp_epsilon'])})"),
        ("report", str(paths["html"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
    Console().print(r["verdict_reason"])
