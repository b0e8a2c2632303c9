"""`make demo`: one run of the training DAG on the embedded default's live local deployment, watched from the terminal.

Brings up the deployment (embedded.deploy.deployment: the services plus a real Airflow with its scheduler,
triggerer, dag-processor and api-server), triggers `ec2_training` on the checkout's branch, prints each task's state as
it changes and the training's epochs as they stream (embedded.cli.live_view), then a summary, and stops. Every log is
in its file under the state folder; `make ui` starts the same deployment again to browse this run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedded.cli.live_view import (
    LogFollower,
    RunSummary,
    epoch_progress,
    log_messages,
    progress_line,
    render,
    state_changes,
)
from embedded.deploy.deployment import (
    ADMIN_USER,
    DAG_ID,
    REPO,
    LocalDeployment,
    Ports,
    log_to_file,
    uncommitted_changes,
)
from embedded.deploy.stack import TrainingKnobs

log = logging.getLogger(__name__)

FINISHED = frozenset({"success", "failed"})
POLL_S = 0.5


def _when(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def watch(deployment: LocalDeployment, run_id: str, timeout_s: float, out: Any = sys.stdout) -> RunSummary:
    """Poll the run until it ends, printing what changes; return its summary with the timings filled in."""
    airflow = deployment.airflow
    started = time.monotonic()
    follower = LogFollower(airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=train")
    states: dict[str, str | None] = {}
    # The train task's earliest start and latest end seen: a deferred task resumes with a new start_date.
    train_start: float | None = None
    train_end: float | None = None
    while True:
        run = airflow.dag_run(DAG_ID, run_id)
        run_state = str(run["state"])
        tis = airflow.task_instances(DAG_ID, run_id)
        now = {task: ti["state"] for task, ti in tis.items()}
        for task, state in state_changes(states, now):
            print(progress_line(time.monotonic() - started, f"{task:<15} {state}"), file=out, flush=True)
        states = dict(now)
        for message in log_messages(follower.new_lines()):
            if epoch := epoch_progress(message):
                print(progress_line(time.monotonic() - started, f"{'train':<15} {epoch}"), file=out, flush=True)
        if train := tis.get("train"):
            start, end = _when(train.get("start_date")), _when(train.get("end_date"))
            train_start = min(filter(None, (train_start, start)), default=None)
            train_end = end or train_end
        if run_state in FINISHED:
            break
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"DAG run {run_id} not finished after {timeout_s:.0f}s: {states}")
        time.sleep(POLL_S)
    # In the order they ran (the API lists them by id); a task that never started comes last.
    order = sorted(tis, key=lambda task: tis[task].get("start_date") or "~")
    summary = RunSummary(
        dag_run_id=run_id,
        state=run_state,
        task_states={task: str(tis[task]["state"]) for task in order},
        task_seconds={task: float(tis[task]["duration"]) for task in order if tis[task].get("duration")},
        # Airflow's own clock, from the trigger to the run's end: not this loop's polling lag.
        run_s=_seconds_between(run.get("queued_at"), run.get("end_date")) or time.monotonic() - started,
        train_s=(train_end - train_start) if train_start and train_end else 0.0,
    )
    return summary


def _seconds_between(first: str | None, last: str | None) -> float | None:
    start, end = _when(first), _when(last)
    return end - start if start is not None and end is not None else None


def fill_in(summary: RunSummary, deployment: LocalDeployment) -> None:
    """What the run left in Airflow's XComs, in EC2 (the instance's final state) and in MLflow."""
    from mlflow import MlflowClient

    from embedded.deploy.airflow_local import AirflowError
    from orchestrator.contracts_steps import Evaluation, LaunchedInstance

    airflow, stack, run_id = deployment.airflow, deployment.stack, summary.dag_run_id

    def xcom(task_id: str, key: str = "return_value") -> Any:
        try:
            return airflow.xcom(DAG_ID, run_id, task_id, key)
        except AirflowError:
            return None

    summary.git_sha = xcom("ci_gate")
    if launched := xcom(LaunchedInstance.STEP):
        instance = LaunchedInstance.from_xcom(launched)
        summary.instance_id, summary.instance_type = instance.instance_id, instance.instance_type
    ec2 = stack.cloud.client("ec2")
    tagged = ec2.describe_instances(Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [run_id]}])
    for reservation in tagged["Reservations"]:
        for inst in reservation["Instances"]:
            summary.instance_states[inst["InstanceId"]] = inst["State"]["Name"]
    summary.mlflow_run_id = xcom("train")
    summary.mlflow_run_url = xcom("train", "mlflow_run_url")
    evaluation = xcom(Evaluation.STEP)
    summary.evaluation = Evaluation.from_xcom(evaluation) if evaluation else None
    report = xcom("report") or {}
    summary.cost, summary.phases = report.get("cost"), report.get("phases_s") or {}
    summary.seconds_to_first_epoch = report.get("seconds_to_first_epoch")
    if summary.mlflow_run_id:
        metrics = MlflowClient(stack.mlflow.url).get_run(summary.mlflow_run_id).data.metrics
        summary.metrics = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("test_")}
    mails, posts = len(stack.smtp.received), len(stack.slack.received)
    summary.notifications = {
        "e-mail": f"{mails} message(s) in the Maildir {stack.smtp.mailbox_dir} (new/, one file each)",
        "Slack": f"{posts} message(s) in {stack.slack.folder} (one JSON file each, as posted)",
    }
    booted = stack.cloud.instances.get(summary.instance_id or "")
    bootstrap_log = stack.cloud.host_path(booted, stack.state_dir / "bootstrap.log") if booted else None
    if bootstrap_log and bootstrap_log.exists():
        summary.bootstrap_skipped = [
            line.split("skipped:", 1)[1].strip()
            for line in bootstrap_log.read_text().splitlines()
            if "skipped:" in line
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state", help="where the deployment keeps its data")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--git-ref", default="", help="branch or full sha to train (default: the checkout's branch)")
    Ports.add_arguments(parser)
    parser.add_argument("--timeout", type=float, default=900, help="seconds the DAG run may take")
    args = parser.parse_args(argv)

    state_root: Path = args.state_dir.resolve()
    log_to_file(state_root / "demo.log")
    if uncommitted_changes():
        print("Note: uncommitted changes are not trained: the instance checks out the committed HEAD only.")
    ports = Ports.from_arguments(args)
    print(f"Starting the embedded services and Airflow (state in {state_root}) ...", flush=True)
    started = time.monotonic()
    with LocalDeployment(state_root, ports=ports, knobs=TrainingKnobs(epochs=args.epochs)) as deployment:
        startup_s = time.monotonic() - started
        run_id = f"demo__{datetime.now(UTC):%Y%m%dT%H%M%S}"
        print(f"Up in {startup_s:.1f} s; triggered {DAG_ID} run {run_id}:", flush=True)
        deployment.airflow.trigger(DAG_ID, run_id, {"git_ref": args.git_ref or deployment.branch})
        summary = watch(deployment, run_id, args.timeout)
        summary.startup_s = startup_s
        fill_in(summary, deployment)
        urls, login = deployment.urls(), (ADMIN_USER, deployment.password)
        print("Stopping the deployment ...", flush=True)
    print(render(summary, urls=urls, login=login, state_root=state_root))
    return 0 if summary.state == "success" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "dags"))
    sys.exit(main())
