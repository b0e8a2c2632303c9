"""Hand a finished run's report to every publisher; none of them can fail the run or hide another one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from orchestrator.contracts import COST_METRICS, PRICE_SOURCE_TAG, RECOVERY_METRICS, USD_PER_HOUR_TAG
from orchestrator.observe.metrics import push_run_metrics
from orchestrator.observe.notify import send_notifications
from orchestrator.observe.report import error_line
from orchestrator.tracking.runs import mlflow_call

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings
    from orchestrator.observe.report import Cost, RunReport

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
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.observe.publish import log_cost
    from orchestrator.tracking.runs import credentials_in_env

    if report.cost is None or report.mlflow_run_id is None:
        log.info("No cost to log in MLflow: %s", "no instance" if report.cost is None else "no MLflow run")
        return
    creds = mlflow_credentials(settings.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        log_cost(settings.mlflow.tracking_uri, report.mlflow_run_id, report.cost, cost_metrics(report, report.cost))


def cost_metrics(report: RunReport, cost: Cost) -> dict[str, float]:
    """The run's cost as MLflow metrics: COST_METRICS, then RECOVERY_METRICS: attempts (the instances launched),
    preemptions (EC2's take-backs), seconds_lost_to_preemption (report.seconds_lost_to_preemption) and
    saving_vs_on_demand (the same instances' billed seconds at their types' on-demand prices minus their cost; absent
    when an on-demand price is unknown)."""
    attempts, preemptions, lost, saving = RECOVERY_METRICS
    values = (cost.usd, cost.billed_s, cost.non_training_s, cost.training_share)
    metrics = {
        **dict(zip(COST_METRICS, values, strict=True)),
        attempts: len(report.attempts),
        preemptions: len(report.preemptions),
        lost: report.seconds_lost_to_preemption,
    }
    if cost.saving_vs_on_demand_usd is not None:
        metrics[saving] = cost.saving_vs_on_demand_usd
    return {name: float(value) for name, value in metrics.items()}


def log_cost(tracking_uri: str, run_id: str, cost: Cost, metrics: dict[str, float]) -> None:
    """Record what the run's instances cost (`metrics`, cost_metrics) on its MLflow run; raises TrackingServerError
    if MLflow refuses."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri=tracking_uri)
    now_ms = int(time.time() * 1000)
    mlflow_call(
        f"logging the cost on run {run_id}",
        client.log_batch,
        run_id,
        metrics=[Metric(name, value, now_ms, 0) for name, value in metrics.items()],
        tags=[RunTag(PRICE_SOURCE_TAG, cost.price_source), RunTag(USD_PER_HOUR_TAG, f"{cost.usd_per_hour:g}")],
    )
    log.info(
        "Run %s cost %.4f USD: %.0f s billed at %s USD/h (%s), %.0f%% of it training",
        run_id,
        cost.usd,
        cost.billed_s,
        f"{cost.usd_per_hour:g}",
        cost.price_source,
        cost.training_share * 100,
    )
