"""MLflow 3.17's UI, in a real browser, opened by the links the project publishes (orchestrator.tracking.views): the
experiment link lands on the runs table, not the GenAI overview, with the trainings' columns."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.tracking.runs import TrackedRun, start_training_run
from orchestrator.tracking.views import experiment_url, runs_view_columns
from tests.ui.conftest import UI_TIMEOUT_MS

pytestmark = pytest.mark.slow

SHA = "a0ca4de0123456789abcdef0123456789abcdef0"


def test_the_experiment_link_opens_the_runs_table_with_the_trainings_columns(
    browser: Any, mlflow_server: MlflowServer
) -> None:
    from mlflow import MlflowClient

    experiment = f"ui-{uuid.uuid4().hex[:8]}"
    tags = {"ec2_trainer.job_key": "ui-1", "mlflow.source.git.commit": SHA, "mlflow.source.type": "PROJECT"}
    run_id = start_training_run(
        mlflow_server.url, experiment, TrackedRun("12:30 manual · a0ca4de", tags), gate_metric="test_accuracy"
    )
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for key, value in {"learning_rate": "0.001", "batch_size": "64", "cache_dir": "/scratch/x"}.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "test_accuracy", 0.91)
    client.log_metric(run_id, "decode_time_s", 2.5)

    # A fresh browser: no view or workflow type stored by an earlier visit.
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(experiment_url(mlflow_server.url, client.get_run(run_id).info.experiment_id))
        # The grid names each column by the key the view lists.
        page.locator('[col-id="metrics.`test_accuracy`"]').first.wait_for()
        shown = {
            page.locator("[role=columnheader][col-id]").nth(n).get_attribute("col-id")
            for n in range(page.locator("[role=columnheader][col-id]").count())
        }
        assert "/runs?" in page.url
        assert set(runs_view_columns("test_accuracy")) - {"params.`model`", "params.`epochs`"} <= shown, shown
        # Chosen columns only: a param or metric the view leaves out stays hidden.
        assert not {"params.`cache_dir`", "metrics.`decode_time_s`"} & shown, shown
        # MLflow's Version column: the commit, shortened.
        assert page.locator('[role=gridcell][col-id="attributes.`Version`"]').inner_text().strip() == SHA[:6]
    finally:
        context.close()
