"""Errors the CLI turns into one clear line and a non-zero exit."""


class RecapError(Exception):
    """A user-facing error: bad arguments, missing inputs, an unusable model."""

    exit_code = 2


class ValidationFailed(RecapError):
    """A batch failed its data-quality suite and must not be published."""

    exit_code = 1
