"""The job's exceptions; each carries the process exit code it maps to.

The job runs on the instance without the orchestrator package, so these do not derive from OrchestratorError.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: a failure the job reports as one clear line on stderr."""

    exit_code = 1


class ParameterError(TrainingError):
    """A job parameter is missing, malformed or out of range."""

    exit_code = 2


class DataError(TrainingError):
    """The dataset cannot be found, fetched or read in the expected layout."""

    exit_code = 3
