"""Errors a user can cause; the CLI prints them as one line and exits with code 2."""


class MoekitError(Exception):
    pass


class ConfigError(MoekitError, ValueError):
    """An invalid configuration value, file or flag."""


class CheckpointError(MoekitError):
    """A missing, incomplete or corrupted checkpoint."""


class TrainingError(MoekitError):
    """Training cannot go on (e.g. the loss became NaN)."""
