"""The orchestrator's exceptions: each message says what went wrong and what to do about it."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(OrchestratorError):
    """A configuration value or a DAG param is invalid; the message names the field. No retry can fix it."""
