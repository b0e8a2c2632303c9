"""Hand a finished run's report to every publisher; none of them can fail the run or hide another one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from orchestrator.observe.metrics import push_run_metrics
from orchestrator.observe.notify import send_notifications
from orchestrator.observe.report import error_line

if TYPE_CHECKING:
    from orchestrator.observe.report import RunReport
    from orchestrator.settings import Settings

log = logging.getLogger(__name__)


def publish(settings: Settings, report: RunReport) -> list[str]:
    """Run each publisher; one that fails is logged as a warning and changes nothing. Returns those that succeeded."""
    publishers: list[tuple[str, Callable[[Settings, RunReport], object]]] = [("mlflow", log_cost_to_mlflow)]
    if settings.notify.enabled:
        # After MLflow: the message's cost and links are those MLflow now holds.
        publishers.append(("notify", send_notifications))
    if settings.metrics.enabled:
        publishers.append(("metrics", push_run_metrics))
    done = []
    for name, publisher in publishers:
        if _guarded(name, publisher, settings, report):
            done.append(name)
    return done


def _guarded(name: str, publisher: Callable[[Settings, RunReport], object], s: Settings, report: RunReport) -> bool:
    try:
        publisher(s, report)
    except Exception as exc:
        # The report is about the run; a publisher's outage is logged, never raised (the run's state stands).
        log.warning("Run report not published to %s: %s", name, error_line(exc))
        return False
    return True


def log_cost_to_mlflow(settings: Settings, report: RunReport) -> None:
    """The cost on the training's MLflow run, when both exist."""
    from orchestrator.connections import mlflow_credentials
    from orchestrator.tracking import credentials_in_env, log_cost

    if report.cost is None or report.mlflow_run_id is None:
        log.info("No cost to log in MLflow: %s", "no instance" if report.cost is None else "no MLflow run")
        return
    creds = mlflow_credentials(settings.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        log_cost(settings.mlflow.tracking_uri, report.mlflow_run_id, report.cost)
