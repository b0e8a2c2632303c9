"""orchestrator.tracking.views: the links to MLflow's runs table and the saved view that sets its columns, checked
as MLflow 3.17's UI reads them (the browser itself: tests/ui/test_mlflow_views.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.tracking.runs import TrackedRun, start_training_run
from orchestrator.tracking.views import RUNS_VIEW_TAG, experiment_url, run_url, runs_view_columns

RUN_ID = "a" * 32


@pytest.mark.parametrize("base", ["http://127.0.0.1:5000", "http://127.0.0.1:5000/"])
def test_the_experiment_link_opens_the_runs_table_in_the_trainings_view(base: str) -> None:
    # The runs tab itself, not the experiment's default (which MLflow picks by the browser's workflow type).
    assert experiment_url(base, "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=ec2-trainer"
    )


def test_a_run_link_keeps_the_model_training_workflow_and_a_path_prefix() -> None:
    assert run_url("https://mlflow.example.com/tracking", "7", RUN_ID) == (
        f"https://mlflow.example.com/tracking/#/experiments/7/runs/{RUN_ID}?workflowType=machine_learning"
    )


def test_the_columns_are_the_commit_the_gates_metric_and_the_hyperparameters() -> None:
    assert runs_view_columns("val_loss") == [
        "attributes.`Version`",
        "metrics.`val_loss`",
        "params.`model`",
        "params.`epochs`",
        "params.`batch_size`",
        "params.`learning_rate`",
    ]


def _view(tracking_uri: str, experiment: str) -> dict[str, object]:
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    envelope = json.loads(found.tags[RUNS_VIEW_TAG])
    # What the UI's saved-view reader requires, or it drops the view.
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    assert envelope["createdAt"] == envelope["updatedAt"] == found.creation_time
    return dict(json.loads(envelope["state"]))


def test_the_training_experiment_carries_the_view_of_the_gates_metric(mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    experiment = f"views-{uuid.uuid4().hex[:8]}"
    tracked = TrackedRun(name="12:30 manual · 0123456", tags={"ec2_trainer.job_key": "views-1"})
    start_training_run(mlflow_server.url, experiment, tracked, gate_metric="test_accuracy")
    assert _view(mlflow_server.url, experiment) == {"selectedColumns": runs_view_columns("test_accuracy")}
    found = MlflowClient(tracking_uri=mlflow_server.url).get_experiment_by_name(experiment)
    assert found.tags["mlflow.experimentKind"] == "custom_model_development"

    # Another gate metric configured: the next run rewrites the view.
    start_training_run(mlflow_server.url, experiment, tracked, gate_metric="test_f1")
    assert _view(mlflow_server.url, experiment) == {"selectedColumns": runs_view_columns("test_f1")}
