"""Exceptions that the CLI turns into a one-line message and exit code 2."""


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
