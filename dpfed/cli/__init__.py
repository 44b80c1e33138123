"""The ``dpfed`` command line: a thin typer app; each command lives in its own module.

Only the CLI configures logging and printing. Errors caused by input (``DpfedError``,
``AccountingError``) are printed as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

app = typer.Typer(
    name="dpfed",
    help="Differentially private federated fine-tuning with Fed-SB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INPUT_ERROR = 2


def _register() -> None:
    from dpfed.cli import audit, budget, comm, compare, plan, train

    app.command("train")(train.train)
    app.command("plan")(plan.plan)
    app.command("budget")(budget.budget)
    app.command("comm")(comm.comm)
    app.command("audit")(audit.audit)
    app.command("compare")(compare.compare)
    # flwr is an optional extra: this module imports it only inside the command
    from dpfed.cli import flower_local

    app.command("flower-local")(flower_local.flower_local)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from accounting.errors import AccountingError
    from dpfed.errors import DpfedError, Interrupted, RunComplete

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # third-party chatter (download/loading bars, load reports) would break the one-line error contract
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)  # with standalone_mode=False, typer.Exit(n) comes back as n
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except (DpfedError, AccountingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_INPUT_ERROR)
    except RunComplete as exc:  # --resume on a finished run: nothing changes
        print(str(exc), file=sys.stderr)
        sys.exit(0)
    except Interrupted as exc:  # Ctrl-C: the run directory is resumable, or removed when nothing was spent
        print(str(exc), file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors come through standalone_mode=False
        # typer may vendor its own click: take the exception classes from typer itself
        click_exc = typer.BadParameter.__mro__[1]  # UsageError of whichever click typer uses
        if isinstance(exc, click_exc):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(EXIT_INPUT_ERROR)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # other ClickExceptions
            exc.show()
            sys.exit(exc.exit_code)
        raise
