"""Retry policies of the DAGs' steps, one place: a DAG file applies one with `**POLICY`.

An outage of the control plane (the api-server, the scheduler, the metadata database) fails a try of whatever step
is running: its task process cannot report and is killed (`[workers] execution_api_retries` bounds how long it
waits). Retried every few seconds, a step spends its tries within a minute of such an outage; backing off
exponentially, its tries span minutes, so the outage costs time instead of the run.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

# The steps a run cannot do without and that are safe to repeat: train re-attaches to the run's one job (or reads
# its result), evaluate's gate is idempotent. Delays 15, 30, 60, 120, 240, 300 s (Airflow adds up to as much again,
# capped): about 13 minutes of tries.
OUTAGE_RETRIES: Final[dict[str, Any]] = {
    "retries": 6,
    "retry_delay": timedelta(seconds=15),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=5),
}
