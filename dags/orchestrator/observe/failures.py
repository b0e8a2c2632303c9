"""Which step failed and why, recorded as it fails: the run report reads it after teardown.

`record_failure` is every task's on_failure_callback (the DAG's default_args): Airflow's task runner calls it once a
task has failed for good (not on a try that will be retried), with the exception in the context, also when the error
was raised in execute_complete after a deferral. It only pushes an XCom; it never raises.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.contracts import FAILURE_KEY
from orchestrator.observe.report import error_line

log = logging.getLogger(__name__)


def record_failure(context: Any) -> None:
    """Push {"task_id", "error"} (the error's first line, with every secret masked) as XCom FAILURE_KEY."""
    try:
        from airflow.sdk.log import redact

        ti = context["ti"]
        line = error_line(context.get("exception"), redact=lambda text: str(redact(text)))
        ti.xcom_push(key=FAILURE_KEY, value={"task_id": ti.task_id, "error": line or "failed (see the task log)"})
    except Exception as exc:
        # A callback that raised would only be logged by Airflow; say plainly what is missing from the report.
        log.warning("Could not record this task's failure for the run report: %s", error_line(exc))
