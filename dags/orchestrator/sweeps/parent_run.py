"""The sweep's parent MLflow run: created before any set starts, read back for its nested runs, ended with the
sweep's verdict. Each set's run nests under it through MLflow's own `mlflow.parentRunId` tag."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.config.settings import Settings
from orchestrator.contracts import DAG_ID_TAG, DAG_RUN_ID_TAG, JOB_KEY_TAG, PARENT_RUN_TAG
from orchestrator.tracking.pages import all_pages

log = logging.getLogger(__name__)

# Parent-run tags: how many sets, the best set's run, and the sweep's verdict.
SETS_TAG = "ec2_trainer.sweep.sets"
BEST_RUN_TAG = "ec2_trainer.sweep.best_run_id"
VERDICT_TAG = "ec2_trainer.sweep.verdict"


@dataclass(frozen=True)
class ChildRun:
    """A set's MLflow run, found by its parent tag."""

    run_id: str
    dag_run_id: str
    status: str
    metrics: Mapping[str, float]


def start_parent_run(s: Settings, git_sha: str, dag_id: str, run_id: str, sets: Sequence[Mapping[str, Any]]) -> str:
    """The sweep's MLflow run in the training experiment: created once, found again by its job key on a retry.

    Its params are the sets (`set_1` = `{"learning_rate": 0.001}`, ...), so the run says what the sweep tried.
    """
    from mlflow import MlflowClient

    from orchestrator.ci.github_protocol import commit_checks_url, repository_url
    from orchestrator.instance.job_script import job_key
    from orchestrator.tracking.runs import TrackedRun, run_name, start_training_run

    tracked = TrackedRun(
        name=run_name(f"sweep {len(sets)} sets", git_sha),
        tags={
            DAG_ID_TAG: dag_id,
            DAG_RUN_ID_TAG: run_id,
            JOB_KEY_TAG: job_key(dag_id, run_id),
            SETS_TAG: str(len(sets)),
            "ci.url": commit_checks_url(s.github.api_url, s.github.repo, git_sha),
            "mlflow.source.git.commit": git_sha,
            "mlflow.source.git.repoURL": repository_url(s.github.api_url, s.github.repo),
            "mlflow.source.name": repository_url(s.github.api_url, s.github.repo),
        },
    )
    parent = start_training_run(s.mlflow.tracking_uri, s.mlflow.experiment, tracked, gate_metric=s.mlflow.metric)
    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    # The same values on a retry: MLflow accepts a param logged again unchanged.
    for number, values in enumerate(sets, start=1):
        client.log_param(parent, f"set_{number}", json.dumps(dict(values), sort_keys=True))
    return parent


def child_runs(tracking_uri: str, parent_run_id: str) -> dict[str, ChildRun]:
    """The runs nested under the parent, by the Airflow run id that trained each."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found: dict[str, ChildRun] = {}
    children = all_pages(
        lambda token: client.search_runs(
            [experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'", max_results=100, page_token=token
        )
    )
    for run in children:
        dag_run_id = run.data.tags.get(DAG_RUN_ID_TAG, "")
        found[dag_run_id] = ChildRun(run.info.run_id, dag_run_id, run.info.status, dict(run.data.metrics))
    return found


def end_parent_run(tracking_uri: str, parent_run_id: str, *, ok: bool, tags: Mapping[str, str]) -> None:
    """Tag the parent with the outcome and end it: FINISHED when every set succeeded, FAILED otherwise."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    client.set_terminated(parent_run_id, "FINISHED" if ok else "FAILED")
    log.info("MLflow run %s (the sweep) ended %s", parent_run_id, "FINISHED" if ok else "FAILED")
