"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class SelfAlignError(Exception):
    """An error caused by the user's input (file, line, field or key named in the message)."""


class InputError(SelfAlignError):
    """Bad input data: a missing or corrupt file, a malformed line, mismatched counts."""


class ConfigError(SelfAlignError):
    """A bad configuration: unknown key, wrong type, invalid value."""
