"""The `report` teardown task's body: assemble the DAG run's RunReport from what its steps left (task outcomes and
durations, XComs, EC2's record of the instances, the MLflow run), then publish it.

Each source is read on its own and guarded: a missing one leaves its fields empty and logs why; nothing here raises
into the task (a report must never fail the run, nor hide why it failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from orchestrator.cloud.ec2_describe import GONE_STATES, describe_instance
from orchestrator.config.settings import Settings
from orchestrator.contracts import (
    BOOTSTRAP_TOTAL,
    CHECKPOINT_ERROR_TAG,
    CI_PASSED_AT_KEY,
    EPOCH_TIME_METRIC,
    FAILURE_KEY,
    MLFLOW_RUN_ID_KEY,
    MLFLOW_RUN_URL_KEY,
    PREEMPTIONS_KEY,
    RECOVERED_READY_KEY,
    SHA_XCOM_KEY,
)
from orchestrator.contracts_steps import Evaluation, LaunchedInstance, LaunchPlan, Preemption, ReadyInstance
from orchestrator.observe.cost import (
    BilledInstance,
    end_reason,
    run_cost,
    seconds_lost_to_preemption,
    transition_time,
)
from orchestrator.observe.report import BEFORE_FIRST_EPOCH_PHASE, RunReport, error_line
from orchestrator.observe.verdict import decide, unfinished_run_end
from orchestrator.tracking.runs import end_mlflow_run
from orchestrator.tracking.training_runs import task_outcomes

log = logging.getLogger(__name__)

TERMINATED_AT_KEY = "observed_at"  # terminate: when it saw its instances' final states (epoch seconds)
_T = TypeVar("_T")


def report_run(settings: Settings, context: Mapping[str, Any]) -> dict[str, Any] | None:
    """Assemble, publish and return the run's report (as an XCom); None, with the reason logged, if it cannot."""
    from orchestrator.observe.publish import publish

    try:
        report = assemble(settings, context)
    except Exception:
        log.exception("No run report: assembling it failed (the run's own state is unaffected)")
        return None
    log.info(
        "Run report: %s%s; cost %s",
        report.outcome,
        f" at {report.failed_step}: {report.error}" if report.failed_step else "",
        f"{report.cost.usd:.4f} USD ({report.cost.price_source})" if report.cost else "none (no instance)",
    )
    publish(settings, report)
    return report.to_dict()


def assemble(s: Settings, context: Mapping[str, Any]) -> RunReport:
    ti, dag, dag_run = context["ti"], context["dag"], context["dag_run"]
    dag_id, run_id = dag.dag_id, context["run_id"]

    def xcom(task_id: str, key: str = "return_value") -> Any:
        return ti.xcom_pull(task_ids=task_id, key=key)

    def result(read: Callable[[object], _T], task_id: str, key: str = "return_value") -> _T | None:
        """A step's typed result; None when it left none, or one this report cannot read (logged)."""
        value = xcom(task_id, key)
        return _guarded(f"{task_id}'s {key}", lambda: read(value), None) if value else None

    no_outcomes: dict[str, tuple[str, float | None]] = {}
    tasks = _guarded("task outcomes", lambda: task_outcomes(ti, dag_id, run_id), no_outcomes)
    order = [task.task_id for task in dag.task_group.topological_sort() if task.task_id != ti.task_id]
    failed = [task_id for task_id in order if tasks.get(task_id, ("", 0.0))[0] == "failed"]
    failed_step = failed[0] if failed else None
    failure = (xcom(failed_step, FAILURE_KEY) or {}) if failed_step else {}
    # The outcome the verdict teardown will give the run (every step this report follows has finished).
    outcome = decide({t: tasks[t][0] if t in tasks else None for t in order}, teardowns_of(dag)) if tasks else None

    git_sha = xcom("ci_gate") or xcom("ci_gate", SHA_XCOM_KEY)
    plan = result(LaunchPlan.from_xcom, LaunchPlan.STEP)
    launched = result(LaunchedInstance.from_xcom, LaunchedInstance.STEP)
    ready = result(ReadyInstance.from_xcom, ReadyInstance.STEP)
    evaluation = result(Evaluation.from_xcom, Evaluation.STEP)
    mlflow_run_id = xcom("train") or xcom("train", MLFLOW_RUN_ID_KEY)
    run = _guarded("the MLflow run", lambda: _mlflow_run(s, mlflow_run_id), None) if mlflow_run_id else None
    if run is not None and (
        status := unfinished_run_end(
            run.info.status, tasks.get("train", ("",))[0], outcome is not None and outcome.stopped
        )
    ):
        _guarded("ending the MLflow run", lambda: end_mlflow_run(s, run.info.run_id, status), None)
    metrics: dict[str, float] = dict(run.data.metrics) if run else {}
    durations = {task_id: duration for task_id, (_, duration) in tasks.items()}
    training_s = _job_seconds(run) if run else durations.get("train")
    phases = phases_of(durations, ready, training_s)
    first_epoch_at = _guarded("the first epoch's start", lambda: _first_epoch_started_at(s, run), None) if run else None
    phases |= before_first_epoch(run, first_epoch_at)
    ci_passed_at = xcom("ci_gate", CI_PASSED_AT_KEY)

    preemptions: list[Preemption] = _guarded(
        "the preemption records",
        lambda: [Preemption.from_xcom(p) for step in Preemption.STEPS for p in xcom(step, PREEMPTIONS_KEY) or []],
        [],
    )
    # Terminate names the live instances it ended; those EC2 took back were gone before it ran, and are billed too.
    by_teardown = list(xcom("terminate") or {})
    ended = by_teardown or ([launched.instance_id] if launched else [])
    instance_ids = [*dict.fromkeys([*(p.instance_id for p in preemptions), *ended])]
    seen_at = float(xcom("terminate", TERMINATED_AT_KEY) or time.time())
    root_volume_gb = plan.root_volume_gb if plan else s.aws.root_volume_gb
    attempts: list[BilledInstance] = _guarded(
        "the attempts' cost",
        lambda: billed_attempts(s, instance_ids, seen_at, preemptions, set(by_teardown), root_volume_gb),
        [],
    )
    cost = run_cost(attempts, training_s or 0.0, s.aws.region)
    # The instance the run was last made ready on: train's after a relaunch, else wait_ready's.
    last_ready = result(ReadyInstance.from_xcom, "train", RECOVERED_READY_KEY) or ready

    links = {"airflow": airflow_run_url(dag_id, run_id)}
    if git_sha:
        from orchestrator.ci.github_protocol import commit_checks_url

        links["ci"] = commit_checks_url(s.github.api_url, s.github.repo, git_sha)
    if mlflow_url := xcom("train", MLFLOW_RUN_URL_KEY):
        links["mlflow"] = mlflow_url
    if run is not None:
        from orchestrator.tracking.views import experiment_url

        links["mlflow_runs"] = experiment_url(s.mlflow.ui_base_url, run.info.experiment_id)
    started = dag_run.start_date.timestamp() if dag_run.start_date else time.time()
    return RunReport(
        dag_id=dag_id,
        run_id=run_id,
        deployment=s.aws.deployment,
        outcome="success" if outcome is None or outcome.ok else "failed",
        failed_step=failed_step,
        # A run stopped by hand: that is the story, whatever the stopped step's own error says.
        error=outcome.reason
        if outcome and outcome.stopped
        else failure.get("error") or (outcome.reason if outcome and not outcome.ok else None),
        git_sha=git_sha,
        instance_id=launched.instance_id if launched else instance_ids[0] if instance_ids else None,
        instance_type=ready.instance_type if ready else launched.instance_type if launched else None,
        market=ready.market if ready else launched.market if launched else None,
        links=links,
        metric_name=s.mlflow.metric,
        metric_value=evaluation.value if evaluation else metrics.get(s.mlflow.metric),
        promoted=evaluation.promoted if evaluation else None,
        promotion_reason=evaluation.reason if evaluation else None,
        duration_s=round(time.time() - started, 1),
        phases_s=phases,
        images_per_s=metrics.get("train_images_per_s"),
        test_metrics={k: v for k, v in sorted(metrics.items()) if k.startswith("test_")},
        cost=cost,
        mlflow_run_id=mlflow_run_id,
        preemptions=[p.to_xcom() for p in preemptions],
        attempts=[a.to_dict() for a in attempts],
        seconds_lost_to_preemption=seconds_lost_to_preemption(attempts, preemptions, last_ready),
        warnings=run_warnings(run),
        seconds_to_first_epoch=round(first_epoch_at - float(ci_passed_at), 1)
        if first_epoch_at is not None and ci_passed_at is not None
        else None,
    )


def run_warnings(run: Any) -> list[str]:
    """What the training's MLflow run says went wrong without failing it: a checkpoint the job could not write (it
    trained on without checkpoints, so a spot interruption would have restarted it from the last one written)."""
    error = run.data.tags.get(CHECKPOINT_ERROR_TAG) if run is not None else None
    line = error_line(error)
    return [f"Checkpoints failed, training went on without them: {line}"] if line else []


def phases_of(
    durations: Mapping[str, float | None], ready: ReadyInstance | None, training_s: float | None
) -> dict[str, float]:
    """Seconds per phase, from the steps' durations and what wait_ready and the job measured; a phase the run
    never reached is absent.

    launch: the launch step (a free slot, RunInstances, until running) and any rest of the wait for running;
    boot: from running to SSH answering; bootstrap: as the instance timed it, whole and bootstrap.<step> (its steps
    partly overlap); training: the job.
    """
    phases: dict[str, float] = {}
    for phase, task_id in (("ci_wait", "ci_gate"), ("launch", "launch")):
        if durations.get(task_id) is not None:
            phases[phase] = float(durations[task_id] or 0.0)
    if ready:
        phases["launch"] = phases.get("launch", 0.0) + ready.seconds_to_running
        phases["boot"] = max(0.0, ready.seconds_to_ssh - ready.seconds_to_running)
        steps = dict(ready.bootstrap_phases_s)
        # Bootstraps before decision 0124 ran their steps one after the other and recorded no total.
        phases["bootstrap"] = steps.pop(BOOTSTRAP_TOTAL, sum(steps.values()))
        for step, seconds in steps.items():
            phases[f"bootstrap.{step}"] = seconds
    if training_s is not None:
        phases["training"] = float(training_s)
    for phase, task_id in (("evaluation", "evaluate"), ("teardown", "terminate")):
        if durations.get(task_id) is not None:
            phases[phase] = float(durations[task_id] or 0.0)
    return {phase: round(seconds, 1) for phase, seconds in phases.items()}


def teardowns_of(dag: Any) -> set[str]:
    return {task.task_id for task in dag.tasks if task.is_teardown}


def judge_run(context: Mapping[str, Any]) -> str:
    """The `verdict` teardown's body: fail (for good) unless every step of the run succeeded; the reason either way.
    A failure to read the states raises as it is, so the task's retries cover a control-plane blip."""
    from airflow.sdk.exceptions import AirflowFailException

    dag, ti = context["dag"], context["ti"]
    finished = task_outcomes(ti, dag.dag_id, context["run_id"])
    verdict = decide(
        {task.task_id: finished.get(task.task_id, (None, None))[0] for task in dag.tasks}, teardowns_of(dag)
    )
    if not verdict.ok:
        raise AirflowFailException(f"The run failed: {verdict.reason}")
    log.info("The run succeeded: %s", verdict.reason)
    return verdict.reason


def airflow_run_url(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI, under [api] base_url (as Airflow builds its own task log links)."""
    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080/")
    return f"{base.rstrip('/')}/dags/{quote(dag_id)}/runs/{quote(run_id)}"


def _guarded(what: str, read: Callable[[], _T], default: _T) -> _T:
    try:
        return read()
    except Exception as exc:
        log.warning("Run report: %s not available: %s", what, error_line(exc))
        return default


def _mlflow_run(s: Settings, run_id: str) -> Any:
    from mlflow import MlflowClient

    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        return MlflowClient(tracking_uri=s.mlflow.tracking_uri).get_run(run_id)


def _first_epoch_started_at(s: Settings, run: Any) -> float | None:
    """When (epoch seconds) the job began its first epoch: the first epoch's metric, logged as it ended, less the
    epoch's own seconds. None before any epoch."""
    from mlflow import MlflowClient

    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        history = MlflowClient(tracking_uri=s.mlflow.tracking_uri).get_metric_history(
            run.info.run_id, EPOCH_TIME_METRIC
        )
    return first_epoch_start(history)


def before_first_epoch(run: Any, first_epoch_at: float | None) -> dict[str, float]:
    """The job's seconds from its start (its MLflow run's) to its first epoch, as a breakdown of "training"."""
    if run is None or first_epoch_at is None or not run.info.start_time:
        return {}
    return {BEFORE_FIRST_EPOCH_PHASE: round(max(0.0, first_epoch_at - run.info.start_time / 1000), 1)}


def first_epoch_start(history: list[Any]) -> float | None:
    """The start (epoch seconds) of the lowest-step epoch in an epoch-time metric's history (MLflow Metric entities:
    step, timestamp in ms, value in seconds)."""
    if not history:
        return None
    first = min(history, key=lambda metric: (metric.step, metric.timestamp))
    return first.timestamp / 1000 - float(first.value)


def _job_seconds(run: Any) -> float | None:
    """The training job's wall time: its MLflow run, created as the job starts and ended by `mlflow run`."""
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000 if start and end else None


def billed_attempts(
    s: Settings,
    instance_ids: list[str],
    seen_at: float,
    preemptions: list[Preemption],
    by_teardown: set[str],
    root_volume_gb: int,
) -> list[BilledInstance]:
    """Every instance's billed time (EC2's launch to the termination request) at its price, with its root volume and
    why it ended, oldest first; an instance EC2 no longer describes is left out (logged)."""
    from orchestrator.config.connections import AwsClients
    from orchestrator.observe.pricing import gp3_usd_per_gb_month, instance_price

    aws = AwsClients(s.aws.conn_id, s.aws.region)
    ec2 = aws.client("ec2")
    volume_price = gp3_usd_per_gb_month(s.aws.region)
    taken_back = {p.instance_id: p.reason for p in preemptions}
    on_demand: dict[str, float] = {}
    billed: list[BilledInstance] = []
    for instance_id in instance_ids:
        info = describe_instance(ec2, instance_id)
        if info is None or info.launch_time is None:
            log.warning("Run report: EC2 no longer describes %s; its cost is left out", instance_id)
            continue
        ended_at = transition_time(info.state_transition_reason) if info.state in GONE_STATES else None
        if ended_at is None:
            if info.state not in GONE_STATES:
                log.warning("Run report: %s is still %s; its cost counts until now", instance_id, info.state)
            ended_at = seen_at if info.state in GONE_STATES else time.time()
        launched_at = info.launch_time.timestamp()
        price = instance_price(aws, s.aws.region, info.instance_type, info.market, info.availability_zone, launched_at)
        if info.market == "on-demand":
            on_demand[info.instance_type] = price.usd_per_hour
        elif info.instance_type not in on_demand:
            # For the saving: what the same seconds would have cost on demand (one price per type and run).
            on_demand[info.instance_type] = instance_price(
                aws, s.aws.region, info.instance_type, "on-demand", None, launched_at
            ).usd_per_hour
        log.info(
            "%s (%s, %s, %s): billed from %s for %.0f s at %s USD/h (%s)",
            instance_id,
            info.instance_type,
            info.market,
            info.availability_zone,
            info.launch_time.isoformat(),
            ended_at - launched_at,
            f"{price.usd_per_hour:g}",
            price.detail,
        )
        billed.append(
            BilledInstance(
                instance_id,
                launched_at,
                ended_at,
                price,
                instance_type=info.instance_type,
                market=info.market,
                availability_zone=info.availability_zone,
                ended_by=end_reason(
                    info.state, info.state_reason, taken_back.get(instance_id), instance_id in by_teardown
                ),
                root_volume_gb=root_volume_gb,
                volume_usd_per_gb_month=volume_price,
                # The fallback table's 0 is "no price known for the type", not a free instance.
                on_demand_usd_per_hour=on_demand[info.instance_type] or None,
            )
        )
    return sorted(billed, key=lambda b: b.launched_at)
