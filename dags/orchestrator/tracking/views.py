"""What MLflow's UI opens on: the experiment's runs table with the trainings' columns, and the links people follow
to it. Pure.

MLflow 3.17's UI ignores `mlflow.experimentKind` when it picks an experiment's first screen: it follows its
"workflow type" (the `workflowType` query parameter, else the browser's stored choice, GenAI by default), so every
link says `machine_learning`. Its runs table opens a saved view named by `viewStateShareKey`, read from the
experiment's tag `mlflow.sharedViewState.<key>`: the experiment link names the view this module defines
(docs/decisions/0114-*.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlencode

from orchestrator.config.run_params import JOB_PARAMS

# MLflow's experiment tag prefix of a saved view, and the id of the view the trainings' experiment carries.
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_ID = "ec2-trainer"
RUNS_VIEW_TAG = SAVED_VIEW_TAG_PREFIX + RUNS_VIEW_ID
RUNS_VIEW_NAME = "Trainings"

# The job's hyperparameters; the data's URI is long and the same for most runs.
KEY_PARAMS: tuple[str, ...] = tuple(name for name in JOB_PARAMS if name != "data_uri")

_ML_WORKFLOW = {"workflowType": "machine_learning"}


def _column(kind: str, key: str) -> str:
    """A runs-table column as MLflow's UI names it: `metrics.`test_accuracy``, `attributes.`Version``."""
    return f"{kind}.`{key}`"


def runs_view_columns(gate_metric: str, params: Sequence[str] = KEY_PARAMS) -> list[str]:
    """The commit (MLflow's "Version" column, the short sha linked to the commit), the gate's metric, the params."""
    return [
        _column("attributes", "Version"),
        _column("metrics", gate_metric),
        *(_column("params", name) for name in params),
    ]


def runs_view_tag_value(gate_metric: str, created_ms: int) -> str:
    """The saved view's tag value: MLflow's envelope (name, creation and update times in ms, the state as JSON text)
    around the runs table's state; its other settings stay MLflow's defaults (newest runs first). `created_ms` (the
    experiment's creation time) keeps the value the same from one run to the next: it is written only when the
    columns change."""
    state = {"selectedColumns": runs_view_columns(gate_metric)}
    return json.dumps(
        {"name": RUNS_VIEW_NAME, "createdAt": created_ms, "updatedAt": created_ms, "state": json.dumps(state)}
    )


def experiment_url(ui_base_url: str, experiment_id: str) -> str:
    """The experiment's runs table, in the trainings' view."""
    query = urlencode({**_ML_WORKFLOW, "viewStateShareKey": RUNS_VIEW_ID})
    return f"{ui_base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def run_url(ui_base_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page; its way back to the experiment stays on the runs table (the UI keeps `workflowType`)."""
    return f"{ui_base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{urlencode(_ML_WORKFLOW)}"
