"""Errors a user can cause. The CLI prints their one-line message without a traceback."""


class MetarunError(Exception):
    """Base of every error that a user can fix: the message says what to do."""


class ConfigError(MetarunError):
    """A config value or combination that cannot work (caught before any training)."""


class DataError(MetarunError):
    """Missing, corrupt or unreadable data, or a download that could not be made."""


class CheckpointError(MetarunError):
    """A checkpoint or run folder that cannot be loaded or resumed from."""


def short_reason(error: BaseException) -> str:
    """An exception as one short line, for error messages that must stay one line."""
    return " ".join(str(error).split())[:200] or type(error).__name__
