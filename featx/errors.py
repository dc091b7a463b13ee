"""Errors featx raises on purpose: each carries a message that says how to fix the input, and an exit code.

The CLI turns any FeatxError into a one-line ``Error: ...`` on stderr and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class FeatxError(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(FeatxError):
    """Bad option values or combinations (exit 2, like argument parsing errors)."""

    exit_code = 2


class DataError(FeatxError):
    """The images or labels cannot be used: empty folder, no images, only garbage, bad layout."""

    exit_code = 3


class WeightsError(FeatxError):
    """Backbone weights are missing, unreadable, unsafe or do not fit the architecture."""

    exit_code = 4


class ArtifactError(FeatxError):
    """A features, head or model file is missing, corrupt, unsafe or does not fit (provenance mismatch)."""

    exit_code = 5


class StrictModeError(FeatxError):
    """``--strict`` was given and something was skipped or drifted."""

    exit_code = 6


class Interrupted(FeatxError):
    """The run was stopped by a signal; partial progress was kept where promised."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, exit_code=128 + signum)
        self.signum = signum
