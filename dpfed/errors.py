"""Exceptions that the CLI turns into a one-line message: exit code 2 for input errors (``DpfedError``),
0 for a finished run asked to resume, 130 for an interrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DpfedError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(DpfedError, ValueError):
    """A configuration value breaks a rule; the message names parameter, rule and value."""


class DataError(DpfedError, ValueError):
    """A dataset is missing, unreadable or unusable (e.g. an empty client shard)."""


class AssetError(DpfedError):
    """An embedded asset is not installed; the message says how to install it."""


class BudgetError(DpfedError):
    """A step would push a client past its privacy budget."""


class PrivacyCheckError(DpfedError):
    """A DP invariant failed (a trainable parameter without per-sample gradient, an adapter that did not change)."""


class RunComplete(Exception):
    """``resume`` on a run that already ended: nothing to do (the CLI says so and exits 0)."""

    def __init__(self, run_dir: Path, summary: dict[str, Any]) -> None:
        done, planned = summary.get("rounds_completed"), summary.get("rounds_planned")
        stop = summary.get("stop_reason")
        why = "" if stop in (None, "completed") else f"; it stopped early: {stop}"
        super().__init__(f"run {run_dir} is complete ({done}/{planned} rounds{why}); nothing to resume")
        self.summary = summary


class Interrupted(Exception):
    """Ctrl-C during a run: where it stands (``round`` is the last checkpointed round, None before the first)."""

    def __init__(self, message: str, *, run_dir: Path, round: int | None) -> None:  # noqa: A002
        super().__init__(message)
        self.run_dir, self.round = run_dir, round
