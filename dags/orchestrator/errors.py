"""The orchestrator's exceptions: each message says what went wrong and what to do about it."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(OrchestratorError):
    """A configuration value or a DAG param is invalid; the message names the field. No retry can fix it."""


def aws_error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError (e.g. InvalidSubnetID.NotFound); "" for anything else."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def aws_error_message(exc: BaseException) -> str:
    """AWS's own message for a ClientError; the exception's text for anything else."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", ""))
    return str(exc)
