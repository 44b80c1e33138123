"""Exceptions of the accounting package."""


class AccountingError(Exception):
    """Base class; the CLI prints the message on one line and exits with code 2."""


class AccountingInputError(AccountingError, ValueError):
    """A parameter breaks a rule; the message names parameter, rule and value."""


class LedgerCorruptError(AccountingError):
    """A ledger line is truncated, unparsable or fails its checksum."""


class BudgetExceededError(AccountingError):
    """Composing an event would push a client past its budget."""


class LedgerMissingError(AccountingError):
    """A ledger that must exist is absent; readers never create one."""


class LedgerKeyError(AccountingError):
    """A ledger key is missing, unsafe or malformed, or does not fit the ledger (keyed vs plain)."""
