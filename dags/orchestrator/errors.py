"""The orchestrator's exceptions: each message says what went wrong and what to do about it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""

    # True where no retry of any step can fix it: fail_without_retry then fails the task on its first try. Set only
    # on classes that every step treats so; one that a step retries stays False and is named at the steps that don't.
    terminal: ClassVar[bool] = False


class ConfigError(OrchestratorError):
    """A configuration value or a DAG param is invalid; the message names the field. No retry can fix it."""

    terminal = True


# What EC2 (UnauthorizedOperation), S3 and the query services (AccessDenied) and the JSON services
# (AccessDeniedException) answer a call the caller's IAM policy does not allow: no retry changes that.
AWS_DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})


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


@contextlib.contextmanager
def fail_without_retry(*errors: type[Exception]) -> Iterator[None]:
    """Errors no retry can fix fail the task at once: retrying a bad instance type only delays the message.

    Every `terminal` error always, and `errors`: what is terminal only here (a type this package does not own, or a
    project error another step retries); also a decorator (`@fail_without_retry()` on an operator's execute)."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except Exception as exc:
        if not (isinstance(exc, errors) or (isinstance(exc, OrchestratorError) and exc.terminal)):
            raise
        raise AirflowFailException(str(exc)) from None
