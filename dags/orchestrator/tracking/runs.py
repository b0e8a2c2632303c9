"""A training's MLflow run: created before the job (found again by a retry), its dataset manifest, found once
finished, ended when its job could not; and the error handling every MLflow call here shares."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orchestrator.contracts import (
    EXPERIMENT_KIND_TAG,
    JOB_KEY_TAG,
    LEFT_TO_SWEEP,
    MANIFEST_ARTIFACT,
    MODEL_TRAINING_KIND,
    PROMOTION_TAG,
    RETRAIN_RUN_PREFIX,
    SET_RUN_ID,
)
from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)


class TrackingError(OrchestratorError):
    """The run or the champion cannot be compared as they are (missing, unfinished, no metric): no retry helps."""

    terminal = True


class TrackingServerError(OrchestratorError):
    """MLflow answered with something other than "does not exist" (auth, server error): fail and retry."""


@contextlib.contextmanager
def credentials_in_env(username: str | None, password: str | None) -> Iterator[None]:
    """MLflow's client reads credentials from the environment only; set them for the block, then restore."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        if username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = username
        if password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_error(exc: Any, doing: str) -> TrackingServerError:
    return TrackingServerError(
        f"MLflow failed while {doing} ({exc.error_code}): {exc.message}; check the MLflow connection's "
        "credentials and the server's health. Nothing is promoted on doubt: the step fails and retries"
    )


@contextlib.contextmanager
def mlflow_output_logged() -> Iterator[None]:
    """For the block, what MLflow writes to stderr goes to the log at its level: an Airflow task log marks every
    stderr line as an ERROR, and MLflow's fluent API writes its progress there, both printed ("Successfully
    registered model 'cnn'.") and through the stderr handler of its loggers. Its loggers hand their records to the
    process's handlers instead (the task log's), and what it prints is logged at INFO. stderr is the process's:
    one block at a time (the callers hold the lock of MLflow's process-wide tracking URI)."""
    mlflow_logger = logging.getLogger("mlflow")
    handlers, propagate = mlflow_logger.handlers, mlflow_logger.propagate
    printed = io.StringIO()
    mlflow_logger.handlers, mlflow_logger.propagate = [], True
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        mlflow_logger.handlers, mlflow_logger.propagate = handlers, propagate
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.info("MLflow: %s", line.strip())


def mlflow_call(doing: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)`, with any MLflow error turned into a TrackingServerError (the step retries)."""
    from mlflow.exceptions import MlflowException

    try:
        return method(*args, **kwargs)
    except MlflowException as exc:
        raise server_error(exc, doing) from exc


def start_training_run(tracking_uri: str, experiment: str, tracked: TrackedRun, *, gate_metric: str) -> str:
    """The id of the MLflow run this DAG run trains into: created once, found again by its job key on a later try.

    The experiment is created, or marked, as a model-training one whose runs table shows `gate_metric`
    (training_experiment). Tags are (re)written each time, so the try number is the latest try's.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = training_experiment(client, experiment, gate_metric)
    query = f"tags.`{JOB_KEY_TAG}` = '{tracked.job_key}'"
    earlier = mlflow_call(
        "searching the DAG run's MLflow run", client.search_runs, [experiment_id], query, max_results=1
    )
    if earlier:
        run_id = str(earlier[0].info.run_id)
        for key, value in tracked.tags.items():
            mlflow_call(f"tagging run {run_id}", client.set_tag, run_id, key, value)
        log.info("MLflow run %s (%s), created by an earlier try of this DAG run", run_id, tracked.name)
        return run_id
    run = mlflow_call(
        f"creating a run in {experiment!r}",
        client.create_run,
        experiment_id,
        tags=dict(tracked.tags),
        run_name=tracked.name,
    )
    log.info("MLflow run %s (%s) created in experiment %s", run.info.run_id, tracked.name, experiment_id)
    return str(run.info.run_id)


def training_experiment(client: Any, experiment: str, gate_metric: str) -> str:
    """The experiment's id, created if missing, its tags written where they differ: the model-training kind (MLflow's
    experiment-kind selector reads it) and the runs table's saved view (tracking.views)."""
    from orchestrator.tracking.views import RUNS_VIEW_TAG, runs_view_tag_value

    found = mlflow_call(f"reading experiment {experiment!r}", client.get_experiment_by_name, experiment)
    if found is None:
        experiment_id = mlflow_call(f"creating experiment {experiment!r}", client.create_experiment, experiment)
        found = mlflow_call(f"reading experiment {experiment!r}", client.get_experiment, experiment_id)
    wanted = {
        EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
        RUNS_VIEW_TAG: runs_view_tag_value(gate_metric, int(found.creation_time or 0)),
    }
    for key, value in wanted.items():
        if found.tags.get(key) != value:
            mlflow_call(
                f"tagging experiment {experiment!r}", client.set_experiment_tag, found.experiment_id, key, value
            )
    return str(found.experiment_id)


def log_dataset_manifest(tracking_uri: str, run_id: str, manifest: dict[str, Any]) -> None:
    """Every key, ETag and size of the run's data, as an artifact: with it the training can be reproduced."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    mlflow_call(f"logging the dataset manifest of run {run_id}", client.log_dict, run_id, manifest, MANIFEST_ARTIFACT)


def find_finished_run(
    tracking_uri: str, experiment: str, tags: Mapping[str, str], *, gated: bool = False
) -> str | None:
    """The id of a FINISHED run of `experiment` carrying every one of `tags` (plain values: hex, names), if any;
    with `gated`, only one whose gate decided (promoted or not; a sweep's set left to the sweep was not gated)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = mlflow_call(f"reading experiment {experiment!r}", client.get_experiment_by_name, experiment)
    if found is None:
        return None
    clauses = [*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'FINISHED'"]
    if gated:
        # MLflow matches `!=` only on runs that have the tag.
        clauses.append(f"tags.`{PROMOTION_TAG}` != '{LEFT_TO_SWEEP}'")
    query = " and ".join(clauses)
    runs = mlflow_call("searching finished runs", client.search_runs, [found.experiment_id], query, max_results=1)
    return str(runs[0].info.run_id) if runs else None


def end_run_if_running(tracking_uri: str, run_id: str, status: str) -> None:
    """End a run its job left RUNNING as `status` (FAILED, KILLED), so the experiment does not list it as running for
    ever.

    Best effort: the caller fails for the training's own reason, which an MLflow outage must not hide.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
            log.info("Ended MLflow run %s as %s: its job did not", run_id, status)
    except MlflowException as exc:
        log.warning("Could not end MLflow run %s as %s (%s): %s", run_id, status, exc.error_code, exc.message)


def experiment_id_of(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id)


def end_mlflow_run(s: Settings, run_id: str, status: str) -> None:
    """End the MLflow run `run_id` as `status` (FAILED, KILLED) if its job left it RUNNING, with the MLflow
    connection's credentials. Best effort, as `end_run_if_running`."""
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env, end_run_if_running

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        end_run_if_running(s.mlflow.tracking_uri, run_id, status)


def tag_mlflow_run(s: Settings, run_id: str, tags: Mapping[str, str]) -> None:
    """Set `tags` on the MLflow run `run_id`, with the MLflow connection's credentials."""
    from mlflow import MlflowClient

    from orchestrator.config.connections import mlflow_credentials

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
        for key, value in tags.items():
            mlflow_call(f"tagging run {run_id}", client.set_tag, run_id, key, value)


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run a DAG run trains into: its name and tags (never a secret), created before the job starts."""

    name: str
    tags: Mapping[str, str]

    @property
    def job_key(self) -> str:
        """Identifies it: one MLflow run per DAG run (as one remote job), whatever the number of task tries."""
        return self.tags[JOB_KEY_TAG]


# A set's number in its run id (contracts.SET_RUN_ID).
_SET_NUMBER_RE = re.compile(re.escape(SET_RUN_ID.split("{number}")[0].replace("{run_id}", "")) + r"(\d+)\Z")
# How ec2_training's run was started, by Airflow's run type. A manual run is the form's, the REST API's or the CLI's:
# the task's view of its DAG run does not say which.
_HOW_TRIGGERED = {"manual": "manual", "scheduled": "scheduled", "asset_triggered": "new data", "backfill": "backfill"}
# Short spellings of the knobs a set's name shows: MLflow's runs table shows about its first 20 characters.
_SHORT_KNOBS = {"learning_rate": "lr", "batch_size": "batch", "data_uri": "data"}
_MAX_VALUE_CHARS = 12


def run_name(lead: str, git_sha: str) -> str:
    """What tells the run apart first, the short commit last: `set 1 lr=0.001 · a0ca4de`."""
    return f"{lead} · {git_sha[:7]}"


def training_run_lead(run_id: str, run_type: str, triggered_at: datetime, swept: Mapping[str, Any]) -> str:
    """A sweep's set: `set 1 lr=0.001`, its number and the values it sets (`swept`); any other ec2_training run:
    `12:30 manual`, when it was triggered (UTC) and how. `run_type` is Airflow's ("manual", "scheduled", ...)."""
    found = _SET_NUMBER_RE.search(run_id)
    if found:
        return " ".join([f"set {found.group(1)}", *(f"{_SHORT_KNOBS.get(k, k)}={_short(v)}" for k, v in swept.items())])
    how = "retrain" if run_id.startswith(RETRAIN_RUN_PREFIX) else _HOW_TRIGGERED.get(run_type, run_type)
    return f"{triggered_at.astimezone(UTC):%H:%M} {how}"


def _short(value: Any) -> str:
    """A URI's last part (`s3://bucket/versions/v3/` -> `v3`), cut to a few characters."""
    text = str(value).rstrip("/").rsplit("/", 1)[-1]
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"
