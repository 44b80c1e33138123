"""Exceptions of the accounting package."""


class AccountingError(Exception):
    """Base class; the CLI prints the message on one line and exits with code 2."""


class AccountingInputError(AccountingError, ValueError):
    """A parameter breaks a rule; the message names parameter, rule and value."""


class LedgerCorruptError(AccountingError):
    """A ledger line is truncated, unparsable or fails its checksum."""


class BudgetExceededError(AccountingError):
    """Composing an event would push a client past its budget."""
