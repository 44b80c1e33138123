"""The ``dpfed`` command line: a thin typer app; each command lives in its own module.

Only the CLI configures logging and printing. Errors caused by input (``DpfedError``,
``AccountingError``) are printed as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Raw tqdm bars (transformers de-quantises a GGUF model under one, outside its own logging) read TQDM_DISABLE when
# tqdm is first imported: set it before any command imports transformers. dpfed's own progress uses rich.
os.environ.setdefault("TQDM_DISABLE", "1")

import typer  # noqa: E402

app = typer.Typer(
    name="dpfed",
    help="Differentially private federated fine-tuning with Fed-SB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INPUT_ERROR = 2
# third-party packages whose FutureWarnings/UserWarnings (deprecations, load reports) are not the user's business
QUIET_PACKAGES = r"(transformers|peft|datasets|torch|huggingface_hub|tokenizers|safetensors|accelerate)(\.|$)"
# loggers whose repeated warnings are shown once per command (the PRV accountant's RDP fallback, per client per round)
ONCE_LOGGERS = ("accounting.prv",)


class _OncePerMessage(logging.Filter):
    """Let the first record of each message template through and drop the repeats (one command's worth)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _once_per_command() -> None:
    for name in ONCE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _OncePerMessage)]:
            logger.removeFilter(old)  # a fresh memory for each command (tests call main() many times)
        logger.addFilter(_OncePerMessage())


def quiet_third_party() -> None:
    """What the CLI (never the library) does to keep third-party chatter off the terminal.

    Download, loading and dataset-generation progress bars off; transformers' logging at error level;
    third-party FutureWarnings and UserWarnings ignored (our own warnings still show).
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' own bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_PACKAGES)
    for name in ("datasets", "transformers", "peft", "huggingface_hub"):
        if name in sys.modules:  # imported before main(): the environment variables came too late for it
            _silence_loaded(name)


def _silence_loaded(name: str) -> None:
    if name == "datasets":
        sys.modules[name].disable_progress_bars()
        sys.modules[name].logging.set_verbosity_error()
    elif name == "transformers":
        sys.modules[name].logging.set_verbosity_error()
        sys.modules[name].logging.disable_progress_bar()
    elif name == "huggingface_hub":
        sys.modules[name].utils.disable_progress_bars()


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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _once_per_command()
    try:
        _main(argv)
    finally:  # the command's memory of shown warnings ends with it (a library caller in the same process sees all)
        _drop_once_filters()


def _drop_once_filters() -> None:
    for name in ONCE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _OncePerMessage)]:
            logger.removeFilter(old)


def _main(argv: list[str] | None) -> None:
    from accounting.errors import AccountingError
    from dpfed.errors import DpfedError, Interrupted, RunComplete

    # third-party chatter (download/loading bars, load reports) would break the one-line error contract
    quiet_third_party()
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
            # typer adds "Did you mean ...?" to the message of an unknown command, and click >= 8.4 adds it again
            # from exc.possibilities: print the message once
            message = exc.message if "Did you mean" in exc.message else exc.format_message()
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_INPUT_ERROR)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # other ClickExceptions
            exc.show()
            sys.exit(exc.exit_code)
        raise
