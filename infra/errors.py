"""Errors a user sees. Each names what was wrong and where, never a bare KeyError."""


class MaskmixError(Exception):
    """Base class for errors maskmix reports to a user as a one-line message."""


class ConfigError(MaskmixError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class ContractError(MaskmixError):
    """An artifact (manifest, mixture, trainer state, shard) is missing, broken or of the wrong version."""
