"""The `summary` task's body on a real MLflow server: it ends the parent run with the summary, which links to that
run's page, and fails the sweep with it when a set failed."""

from __future__ import annotations

import uuid

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.contracts import DAG_RUN_ID_TAG, PARENT_RUN_TAG


def test_the_summary_ends_the_parent_run_and_links_to_it(mlflow_server: MlflowServer) -> None:
    from airflow.sdk.exceptions import AirflowFailException
    from mlflow import MlflowClient

    from orchestrator.config.settings import load_settings
    from orchestrator.sweeps.parent_run import VERDICT_TAG
    from orchestrator.sweeps.steps import summarize

    experiment = f"sweep-summary-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id).info.run_id
    children = []
    for number, value in ((1, 0.7), (2, 0.9)):
        dag_run_id = f"sweep__1__set{number}"
        child = client.create_run(experiment_id, tags={PARENT_RUN_TAG: parent, DAG_RUN_ID_TAG: dag_run_id})
        client.log_metric(child.info.run_id, "test_accuracy", value)
        client.set_terminated(child.info.run_id, "FINISHED")
        conf = {"learning_rate": number / 1000, "mlflow_parent_run_id": parent, "promote": "false"}
        children.append({"trigger_run_id": dag_run_id, "conf": conf})
    s = load_settings(
        env={
            "TRAINER__AWS__DEPLOYMENT": "test",
            "TRAINER__MLFLOW__TRACKING_URI": mlflow_server.url,
            "TRAINER__MLFLOW__EXPERIMENT": experiment,
        }
    )
    page = f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{parent}?workflowType=machine_learning"

    states = {"sweep__1__set1": "success", "sweep__1__set2": "failed"}
    with pytest.raises(AirflowFailException) as failed:
        summarize(s, children, {"best_set": None}, states.__getitem__)
    # Set 2's DAG run failed, so set 1 is the best that counts, whatever set 2's metric.
    assert str(failed.value).startswith("1 of 2 sets failed: set 2 (learning_rate=0.002)")
    assert "; best: set 1 (learning_rate=0.001), test_accuracy = 0.7000; " in str(failed.value)
    assert str(failed.value).endswith(f"; parent MLflow run: {page}")
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags[VERDICT_TAG] == str(failed.value)
