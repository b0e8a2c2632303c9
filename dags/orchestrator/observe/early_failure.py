"""A failure no run report will announce: a step that fails before the launch's setup has succeeded.

The `report` teardown sends the run's notifications and pushes its metrics, but a teardown runs only once its
setup (`plan_launch`) succeeded: a red CI, a bad configuration or a failed preflight leave no report.
`announce_early_failure`, an on_failure_callback of every task (the DAG's default_args), sends those runs' failure
notice and pushes their metrics (a failed run in the Pushgateway's `none` group: no instance type, no market) from the
failing task itself, with what is known that early (no instance, no cost); for any later step it does nothing, the
report will.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.observe.report import RunReport, error_line

log = logging.getLogger(__name__)

REPORT_TASK_ID = "report"


def report_will_run(dag: Any, failed_task_id: str) -> bool:
    """Whether the report teardown still runs after this task failed: not when the task is one of its setups or
    upstream of one (a DAG without that task reports nothing either way)."""
    if REPORT_TASK_ID not in dag.task_dict:
        return True
    setups = [task for task in dag.get_task(REPORT_TASK_ID).upstream_list if task.is_setup]
    return not any(
        failed_task_id == setup.task_id or failed_task_id in setup.get_flat_relative_ids(upstream=True)
        for setup in setups
    )


def early_report(context: Any, settings: Any) -> RunReport:
    """The report of a run that failed at `context`'s task before anything was launched."""
    from airflow.sdk.log import redact

    from orchestrator.ci.github_protocol import commit_checks_url
    from orchestrator.contracts import SHA_XCOM_KEY
    from orchestrator.observe.gather import airflow_run_url

    ti, dag_run = context["ti"], context["dag_run"]
    dag_id, run_id = context["dag"].dag_id, context["run_id"]
    git_sha = ti.xcom_pull(task_ids="ci_gate") or ti.xcom_pull(task_ids="ci_gate", key=SHA_XCOM_KEY)
    links = {"airflow": airflow_run_url(dag_id, run_id)}
    if git_sha:
        links["ci"] = commit_checks_url(settings.github.api_url, settings.github.repo, git_sha)
    started = dag_run.start_date.timestamp() if dag_run.start_date else time.time()
    return RunReport(
        dag_id=dag_id,
        run_id=run_id,
        deployment=settings.aws.deployment,
        outcome="failed",
        failed_step=ti.task_id,
        error=error_line(context.get("exception"), redact=lambda text: str(redact(text)))
        or "failed (see the task log)",
        git_sha=git_sha,
        instance_id=None,
        instance_type=None,
        market=None,
        links=links,
        metric_name=settings.mlflow.metric,
        metric_value=None,
        promoted=None,
        promotion_reason=None,
        duration_s=round(time.time() - started, 1),
        phases_s={},
        images_per_s=None,
        test_metrics={},
        cost=None,
    )


def _settings_for(ti: Any) -> Any:
    """The run's settings; when resolving them is what failed, the deployment's own (defaults, file, environment)."""
    from orchestrator.config.resolve import settings_of
    from orchestrator.config.settings import load_settings

    config = ti.xcom_pull(task_ids="resolve_config")
    return settings_of(config) if config else load_settings()


def announce_early_failure(context: Any) -> None:
    """on_failure_callback: the failure notice and the metrics of a run that will have no report. Never raises."""
    from orchestrator.observe.metrics import push_run_metrics
    from orchestrator.observe.notify import send_notifications

    try:
        if report_will_run(context["dag"], context["ti"].task_id):
            return
        settings = _settings_for(context["ti"])
        report = early_report(context, settings)
    except Exception as exc:
        log.warning(
            "No failure notification or run metrics for this run (the run's outcome is unchanged): %s", error_line(exc)
        )
        return
    # Each logs its own failure and never raises: a notifier that is down does not keep the run out of the metrics.
    send_notifications(settings, report)
    push_run_metrics(settings, report)
