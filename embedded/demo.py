"""`make demo`: run the training DAG end to end on the embedded default and print what happened and where to look.

Starts the local services (embedded.stack), runs the real `ec2_training` DAG with Airflow's `dag.test()` (every task,
the deferred CI gate included, runs in this process), stops the services, and prints a summary. Airflow's and
MLflow's data stay under .state/ so `make ui` can show the result afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "ec2_training"


@dataclass
class RunSummary:
    dag_run_id: str
    state: str
    task_states: dict[str, str]
    git_sha: str | None = None
    instance_id: str | None = None
    instance_type: str | None = None
    instance_states: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    task_seconds: dict[str, float] = field(default_factory=dict)
    bootstrap_skipped: list[str] = field(default_factory=list)


def configure_airflow(home: Path) -> None:
    """Airflow reads its home and DAGs folder at import: set them first."""
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    sys.path.insert(0, str(REPO / "dags"))


def trigger(run_conf: dict[str, Any] | None = None) -> Any:
    """One run of the training DAG, in-process; returns the DagRun (its state says whether it failed)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if DAG_ID not in bag.dags:
        raise RuntimeError(f"DAG {DAG_ID} did not load: {bag.import_errors}")
    return bag.dags[DAG_ID].test(run_conf=run_conf or {})


def summarize(dag_run: Any, stack: Any) -> RunSummary:
    """Collect what a person wants to see from Airflow's records, the cloud and MLflow."""
    from mlflow import MlflowClient

    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    summary = RunSummary(
        dag_run_id=dag_run.run_id,
        state=str(dag_run.state),
        task_states={task_id: str(ti.state) for task_id, ti in tis.items()},
        task_seconds={
            task_id: round((ti.end_date - ti.start_date).total_seconds(), 1)
            for task_id, ti in tis.items()
            if ti.start_date and ti.end_date
        },
    )

    def xcom(task_id: str, key: str = "return_value") -> Any:
        return tis[task_id].xcom_pull(task_ids=task_id, key=key) if task_id in tis else None

    summary.git_sha = xcom("ci_gate")
    launched = xcom("launch")
    if launched:
        summary.instance_id = launched["instance_id"]
        summary.instance_type = launched["instance_type"]
    ec2 = stack.cloud.client("ec2")
    for reservation in ec2.describe_instances(Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [dag_run.run_id]}])[
        "Reservations"
    ]:
        for inst in reservation["Instances"]:
            summary.instance_states[inst["InstanceId"]] = inst["State"]["Name"]
    summary.mlflow_run_id = xcom("train")
    summary.mlflow_run_url = xcom("train", "mlflow_run_url")
    summary.evaluation = xcom("evaluate")
    if summary.mlflow_run_id:
        metrics = MlflowClient(stack.mlflow.url).get_run(summary.mlflow_run_id).data.metrics
        summary.metrics = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("test_")}
    booted = stack.cloud.instances.get(summary.instance_id or "")
    bootstrap_log = stack.cloud.host_path(booted, stack.state_dir / "bootstrap.log") if booted else None
    if bootstrap_log and bootstrap_log.exists():
        summary.bootstrap_skipped = [
            line.split("skipped:", 1)[1].strip()
            for line in bootstrap_log.read_text().splitlines()
            if "skipped:" in line
        ]
    return summary


def render(summary: RunSummary, wall_s: float, state_root: Path) -> str:
    train_s = summary.task_seconds.get("train", 0.0)
    lines = [
        "",
        "=" * 78,
        f"DAG run      {summary.dag_run_id}: {summary.state.upper()}",
        "tasks        " + ", ".join(f"{t}={s}" for t, s in summary.task_states.items()),
        f"commit       {summary.git_sha or '-'}",
        f"instance     {summary.instance_id or '-'} ({summary.instance_type or '-'})",
        "final state  "
        + (", ".join(f"{i}: {s}" for i, s in summary.instance_states.items()) or "no instance launched"),
        f"MLflow run   {summary.mlflow_run_id or '-'}",
        f"             {summary.mlflow_run_url or ''}",
        "metrics      " + (", ".join(f"{k}={v}" for k, v in summary.metrics.items()) or "-"),
    ]
    if summary.evaluation:
        verdict = "promoted to champion" if summary.evaluation["promoted"] else "not promoted"
        lines.append(f"model gate   {verdict}: {summary.evaluation['reason']}")
    lines += [
        "skipped here " + ("; ".join(summary.bootstrap_skipped) or "nothing"),
        f"wall time    {wall_s:.1f} s in all; training task {train_s:.1f} s; outside training {wall_s - train_s:.1f} s",
        "task times   " + ", ".join(f"{t} {s}s" for t, s in summary.task_seconds.items()),
        "",
        "Look closer:",
        "  make ui      then open the Airflow UI at http://127.0.0.1:8080 (user admin, password printed by make ui)",
        "               and the MLflow UI at http://127.0.0.1:5000 (experiment hurricane-damage-embedded)",
        f"  data        {state_root}",
        "=" * 78,
    ]
    return "\n".join(lines)


def _current_branch() -> str:
    """The checkout's branch (or its sha when detached): what the embedded GitHub stand-in knows as the ref."""
    out = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    )
    branch = out.stdout.strip()
    if branch == "HEAD":
        branch = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    return branch.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state", help="where services keep their data")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--git-ref", default="", help="branch or full sha to train (default: the checkout's branch)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    state_root: Path = args.state_dir.resolve()
    configure_airflow(state_root / "airflow")
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout
    if dirty.strip():
        logging.warning("Uncommitted changes are not trained: the instance checks out the committed HEAD only.")

    from embedded.stack import EmbeddedStack, TrainingKnobs

    started = time.monotonic()
    with EmbeddedStack(state_root / "services", REPO, knobs=TrainingKnobs(epochs=args.epochs)) as stack:
        os.environ.update(stack.environment())
        from airflow.utils import db

        db.initdb()
        dag_run = trigger({"git_ref": args.git_ref or _current_branch()})
        wall_s = time.monotonic() - started
        summary = summarize(dag_run, stack)
    print(render(summary, wall_s, state_root))
    return 0 if summary.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
