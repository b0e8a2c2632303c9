"""orchestrator.tracking.promotion: the promotion rule (pure) and evaluate_and_promote against a real MLflow server."""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.config.settings import Settings
from orchestrator.contracts import ALIAS_MOVED_TAG, CONTENDER_TAG
from orchestrator.contracts_steps import Evaluation
from orchestrator.instance.job_script import job_key
from orchestrator.tracking.promotion import (
    CHAMPION_ALIAS,
    CONTEST_LEASE_S,
    _live_contenders,
    contender_lease_until,
    contends_until,
    decide_promotion,
    evaluate_and_promote,
    model_description,
)
from orchestrator.tracking.runs import (
    TrackedRun,
    TrackingError,
    TrackingServerError,
    credentials_in_env,
    end_run_if_running,
    start_training_run,
)
from tests.support.mlflow_servers import FaultProxy

METRIC = "test_accuracy"

# ---- the rule


@pytest.mark.parametrize(
    ("value", "threshold", "champion", "greater", "promote", "reason"),
    [
        (0.85, 0.90, None, True, False, r"0\.8500 does not reach the threshold 0\.9000 \(above needed\)"),
        (0.90, 0.90, None, True, True, r"0\.9000 passes the threshold 0\.9000; there is no champion yet"),
        (0.95, 0.90, None, True, True, r"there is no champion yet"),
        (0.95, 0.90, 0.93, True, True, r"0\.9500 passes the threshold 0\.9000 and beats the champion's 0\.9300"),
        (0.93, 0.90, 0.93, True, False, r"0\.9300 does not beat the current champion's 0\.9300"),
        (0.91, 0.90, 0.93, True, False, r"does not beat the current champion's 0\.9300"),
        (0.85, 0.90, 0.80, True, False, r"does not reach the threshold"),
        # lower is better (a loss)
        (0.30, 0.25, None, False, False, r"0\.3000 does not reach the threshold 0\.2500 \(below needed\)"),
        (0.25, 0.25, None, False, True, r"no champion yet"),
        (0.10, 0.25, 0.20, False, True, r"beats the champion's 0\.2000"),
        (0.20, 0.25, 0.20, False, False, r"does not beat the current champion's 0\.2000"),
        (0.22, 0.25, 0.20, False, False, r"does not beat"),
    ],
)
def test_decide_promotion(
    value: float, threshold: float, champion: float | None, greater: bool, promote: bool, reason: str
) -> None:
    decision = decide_promotion(value, threshold, champion, greater_is_better=greater)
    assert decision.promote is promote
    assert re.search(reason, decision.reason), decision.reason


# ---- the contender lease's tag


def test_the_lease_is_written_as_an_iso_utc_date_time() -> None:
    assert contender_lease_until(0.0) == "1970-01-01T00:30:00Z"
    assert contends_until(contender_lease_until(1_700_000_000.4)) == 1_700_000_000 + CONTEST_LEASE_S


@pytest.mark.parametrize(
    ("tag", "until"),
    [
        ("1700001800", 1_700_001_800.0),  # the epoch form registries written before hold
        ("2023-11-14T22:43:20Z", 1_700_001_800.0),
        ("2023-11-14T23:43:20+01:00", 1_700_001_800.0),
        (None, 0.0),
        ("", 0.0),
        ("soon", 0.0),  # unreadable: no lease rather than a lease for ever
    ],
)
def test_a_lease_reads_in_either_form(tag: str | None, until: float) -> None:
    assert contends_until(tag) == until


# ---- credentials for the MLflow client

_CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def test_credentials_in_env_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "before")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with credentials_in_env("alice", "s3cret"):
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret")
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "before"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_credentials_in_env_restores_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CRED_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="boom"), credentials_in_env("alice", "s3cret"):
        raise RuntimeError("boom")
    assert not any(name in os.environ for name in _CRED_VARS)


def test_credentials_in_env_without_credentials_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "kept")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    with credentials_in_env(None, ""):
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "kept"
        assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "kept"


# ---- against a real MLflow server


@pytest.fixture
def tracking_uri(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import mlflow
    from mlflow.tracking import fluent

    # set_tracking_uri and set_experiment also write MLFLOW_* variables: monkeypatch restores them afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment(f"tracking-{uuid.uuid4().hex[:8]}")
    yield mlflow_server.url
    mlflow.set_tracking_uri(previous)
    fluent._active_experiment_id = None


@pytest.fixture
def model_name() -> str:
    return f"cnn-{uuid.uuid4().hex[:8]}"


def finished_run(metrics: dict[str, float], *, with_model: bool = True) -> str:
    """A finished run with `metrics` and, optionally, a tiny pyfunc model logged under the name "model"."""
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Constant(PythonModel):
        def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[float]:
            return [0.5] * len(model_input)

    with mlflow.start_run() as run:
        for key, value in metrics.items():
            mlflow.log_metric(key, value)
        if with_model:
            # pip_requirements given: skips MLflow's slow requirement inference.
            mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"])
    return str(run.info.run_id)


def evaluate(tracking_uri: str, run_id: str, model_name: str, **overrides: Any) -> Evaluation:
    kwargs: dict[str, Any] = {
        "metric": METRIC,
        "threshold": 0.9,
        "greater_is_better": True,
        "ui_base_url": tracking_uri,
    }
    kwargs |= overrides
    return evaluate_and_promote(tracking_uri, run_id, model_name=model_name, **kwargs)


def champion(tracking_uri: str, model_name: str) -> tuple[str, str]:
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    return str(version.version), str(version.run_id)


def tags_of(tracking_uri: str, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags)


def test_champion_lifecycle(tracking_uri: str, model_name: str) -> None:
    first = finished_run({METRIC: 0.92})
    result = evaluate(tracking_uri, first, model_name)
    assert (result.promoted, result.model_version, result.champion_value, result.value) == (True, "1", None, 0.92)
    assert champion(tracking_uri, model_name) == ("1", first)
    assert tags_of(tracking_uri, first)["ec2_trainer.promotion"] == "promoted"
    assert Evaluation.from_xcom(result.to_xcom()) == result and result.to_xcom()["run_id"] == first

    worse = finished_run({METRIC: 0.91})
    result = evaluate(tracking_uri, worse, model_name)
    assert (result.promoted, result.model_version, result.champion_value) == (False, None, 0.92)
    assert champion(tracking_uri, model_name) == ("1", first)
    tags = tags_of(tracking_uri, worse)
    assert tags["ec2_trainer.promotion"] == "not_promoted"
    assert tags["ec2_trainer.promotion_reason"] == "0.9100 does not beat the current champion's 0.9200"

    better = finished_run({METRIC: 0.97})
    result = evaluate(tracking_uri, better, model_name)
    assert (result.promoted, result.model_version, result.champion_value) == (True, "2", 0.92)
    assert champion(tracking_uri, model_name) == ("2", better)


def test_mlflow_s_registration_messages_are_info_records_not_stderr(
    tracking_uri: str, model_name: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An Airflow task log marks every stderr line as an ERROR: MLflow's success messages, which it prints there,
    showed in evaluate's log as red errors. They are INFO records now, and nothing of MLflow's reaches stderr."""
    run_id = finished_run({METRIC: 0.95})
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        evaluate(tracking_uri, run_id, model_name)
    assert "model" not in capsys.readouterr().err
    levels = {record.getMessage(): record.levelno for record in caplog.records}
    assert levels[f"MLflow: Successfully registered model '{model_name}'."] == logging.INFO
    assert levels[f"MLflow: Created version '1' of model '{model_name}'."] == logging.INFO
    # No warning either: the model is registered from its logged model's URI, not runs:/<run>/model, which MLflow 3
    # warns about before falling back to the same.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # MLflow's loggers' records reach the log's handlers at their level (it waits for the version at INFO).
    assert any(r.name.startswith("mlflow.") and r.levelno == logging.INFO for r in caplog.records)


def test_the_registered_version_says_where_it_comes_from_and_why(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    sha = "0123456789abcdef0123456789abcdef01234567"
    run_id = finished_run({METRIC: 0.95})
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, "mlflow.source.git.commit", sha)
    client.set_tag(run_id, "airflow.run_id", "manual__1")
    result = evaluate(tracking_uri, run_id, model_name)

    version = client.get_model_version(model_name, str(result.model_version))
    reason = "test_accuracy 0.9500 passes the threshold 0.9000; there is no champion yet"
    assert version.description == f"Trained by MLflow run {run_id} from commit {sha} (Airflow run manual__1). " + (
        f"Gate: {reason}."
    )
    # The gate's own bookkeeping tags carry timestamps; the rest says where the version comes from.
    assert float(version.tags[ALIAS_MOVED_TAG]) > 0
    assert {k: v for k, v in version.tags.items() if k not in (CONTENDER_TAG, ALIAS_MOVED_TAG)} == {
        "run_id": run_id,
        "git_commit": sha,
        "gate_reason": reason,
        "airflow.run_id": "manual__1",
    }


def test_the_registered_model_says_what_it_is_how_it_is_promoted_and_where_its_runs_are(
    tracking_uri: str, model_name: str
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = finished_run({METRIC: 0.95})
    evaluate(tracking_uri, run_id, model_name, ui_base_url="https://mlflow.example.com")
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    description = client.get_registered_model(model_name).description
    runs = f"https://mlflow.example.com/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert description == model_description(
        METRIC,
        0.9,
        greater_is_better=True,
        experiment=experiment.name,
        runs_url=runs + "&viewStateShareKey=ec2-trainer",
    )
    assert "`champion` alias moves to it only when its `test_accuracy` reaches 0.9 (higher is better)" in description
    assert f"Training runs: MLflow experiment `{experiment.name}`, {runs}" in description

    # The gate configured otherwise: the next registration rewrites it.
    better = finished_run({METRIC: 0.97})
    evaluate(tracking_uri, better, model_name, threshold=0.96, ui_base_url="https://mlflow.example.com")
    assert "reaches 0.96 (higher is better)" in client.get_registered_model(model_name).description


def test_leases_in_both_forms_count_until_they_run_out(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.create_registered_model(model_name)
    now = time.time()
    leases = [f"{now + 600:.0f}", f"{now - 600:.0f}", contender_lease_until(now), contender_lease_until(now - 3600)]
    for lease in leases:
        run_id = finished_run({METRIC: 0.9})
        version = client.create_model_version(model_name, f"runs:/{run_id}/model", run_id=run_id)
        client.set_model_version_tag(model_name, version.version, CONTENDER_TAG, lease)
    assert [scored.version for scored in _live_contenders(client, model_name, METRIC)] == ["1", "3"]


def _tracked(run_id: str, try_number: int) -> TrackedRun:
    tags = {"airflow.dag_id": "ec2_training", "airflow.run_id": run_id, "airflow.try_number": str(try_number)}
    return TrackedRun(name=f"0123456 {run_id}", tags=tags | {"ec2_trainer.job_key": job_key("ec2_training", run_id)})


def test_one_mlflow_run_per_dag_run_in_a_model_training_experiment(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = f"training-{uuid.uuid4().hex[:8]}"
    first = start_training_run(tracking_uri, experiment, _tracked("manual__1", 1), gate_metric=METRIC)
    created = client.get_experiment_by_name(experiment)
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(first)
    assert (run.info.run_name, run.info.status, run.data.tags["airflow.try_number"]) == (
        "0123456 manual__1",
        "RUNNING",
        "1",
    )

    # A retry of the task finds the run its first try created, and records its own try number.
    assert start_training_run(tracking_uri, experiment, _tracked("manual__1", 2), gate_metric=METRIC) == first
    assert client.get_run(first).data.tags["airflow.try_number"] == "2"
    # A deployment's allowed_run_id_pattern may let a quote through: the search never sees the run id itself.
    quoted = start_training_run(tracking_uri, experiment, _tracked("manual__it's", 1), gate_metric=METRIC)
    assert quoted != first
    assert start_training_run(tracking_uri, experiment, _tracked("manual__it's", 2), gate_metric=METRIC) == quoted
    assert len(client.search_runs([created.experiment_id])) == 2


def test_an_existing_experiment_is_marked_as_model_training(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = f"genai-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    start_training_run(tracking_uri, experiment, _tracked("manual__1", 1), gate_metric=METRIC)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_below_threshold_registers_nothing(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    run_id = finished_run({METRIC: 0.5}, with_model=False)
    result = evaluate(tracking_uri, run_id, model_name)
    assert not result.promoted
    assert "does not reach the threshold" in tags_of(tracking_uri, run_id)["ec2_trainer.promotion_reason"]
    assert MlflowClient(tracking_uri=tracking_uri).search_registered_models(f"name = '{model_name}'") == []


def test_a_sweeps_run_logs_its_verdict_but_never_registers_or_moves_the_alias(
    tracking_uri: str, model_name: str
) -> None:
    from mlflow import MlflowClient

    run_id = finished_run({METRIC: 0.95})
    result = evaluate(tracking_uri, run_id, model_name, promote=False)
    assert (result.promoted, result.model_version, result.value) == (False, None, 0.95)
    tags = tags_of(tracking_uri, run_id)
    assert tags["ec2_trainer.promotion"] == "left_to_sweep"
    assert tags["ec2_trainer.promotion_reason"] == (
        "0.9500 passes the threshold 0.9000; there is no champion yet; left to the sweep, which gates its best run only"
    )
    assert MlflowClient(tracking_uri=tracking_uri).search_registered_models(f"name = '{model_name}'") == []
    # The sweep's gate then decides on its best run, as for a run of its own.
    assert evaluate(tracking_uri, run_id, model_name).promoted
    assert tags_of(tracking_uri, run_id)["ec2_trainer.promotion"] == "promoted"


def test_lower_is_better_metric(tracking_uri: str, model_name: str) -> None:
    run_id = finished_run({"val_loss": 0.1})
    result = evaluate(tracking_uri, run_id, model_name, metric="val_loss", threshold=0.3, greater_is_better=False)
    assert result.promoted
    assert champion(tracking_uri, model_name) == ("1", run_id)


def test_missing_metric_is_named(tracking_uri: str, model_name: str) -> None:
    run_id = finished_run({"val_accuracy": 0.99}, with_model=False)
    with pytest.raises(TrackingError, match=r"has no metric 'test_accuracy' \(it has \['val_accuracy'\]\)"):
        evaluate(tracking_uri, run_id, model_name)


def test_unfinished_run_is_refused(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(client.create_experiment(f"unfinished-{uuid.uuid4().hex[:8]}"))
    client.log_metric(run.info.run_id, METRIC, 0.99)
    with pytest.raises(TrackingError, match=r"is RUNNING, not FINISHED"):
        evaluate(tracking_uri, run.info.run_id, model_name)
    client.set_terminated(run.info.run_id, "FAILED")
    with pytest.raises(TrackingError, match=r"is FAILED, not FINISHED"):
        evaluate(tracking_uri, run.info.run_id, model_name)


def test_unknown_run_is_refused(tracking_uri: str, model_name: str) -> None:
    unknown = uuid.uuid4().hex
    with pytest.raises(TrackingError, match=rf"MLflow run {unknown} not found on {tracking_uri}"):
        evaluate(tracking_uri, unknown, model_name)


# ---- what "no champion" means, and errors that must never promote


def test_a_registered_model_without_the_alias_has_no_champion(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).create_registered_model(model_name)
    run_id = finished_run({METRIC: 0.92})
    result = evaluate(tracking_uri, run_id, model_name)
    assert (result.promoted, result.champion_value) == (True, None)
    assert champion(tracking_uri, model_name) == ("1", run_id)


def test_a_champion_whose_run_lacks_the_metric_fails_the_evaluation(tracking_uri: str, model_name: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    unscored = finished_run({"val_accuracy": 0.5})
    mlflow.register_model(f"runs:/{unscored}/model", model_name)
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(model_name, CHAMPION_ALIAS, "1")
    challenger = finished_run({METRIC: 0.99})
    with pytest.raises(
        TrackingError,
        match=rf"{model_name} version 1's run {unscored} has no metric 'test_accuracy', so no model can be shown "
        rf"to beat it: log 'test_accuracy' on that run, or move alias 'champion'",
    ):
        evaluate(tracking_uri, challenger, model_name)
    assert champion(tracking_uri, model_name) == ("1", unscored)
    assert "ec2_trainer.promotion" not in tags_of(tracking_uri, challenger)


def _first_registry_reads(times: int, status: int, body: str) -> Any:
    """A blip: the first `times` reads of the registry get `status`; everything after goes through."""
    left = [times]

    def fault(method: str, path: str) -> tuple[int, str] | None:
        if method == "GET" and "/registered-models/" in path and left[0] > 0:
            left[0] -= 1
            return status, body
        return None

    return fault


UNAUTHENTICATED = "You are not authenticated. Please see the MLflow docs on how to authenticate."  # MLflow auth's 401


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        pytest.param(401, UNAUTHENTICATED, "UNAUTHENTICATED", id="401"),
        pytest.param(403, "Permission denied", "PERMISSION_DENIED", id="403"),
        pytest.param(503, "Service Unavailable", "INTERNAL_ERROR", id="503"),  # after MLflow's own retries
    ],
)
def test_a_registry_error_fails_the_evaluation_and_promotes_nothing(
    tracking_uri: str,
    model_name: str,
    mlflow_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: str,
    code: str,
) -> None:
    # MLflow retries a 5xx itself (7 times with backoff by default): twice, at once, keeps the test short.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    first = finished_run({METRIC: 0.95})
    assert evaluate(tracking_uri, first, model_name).promoted
    worse = finished_run({METRIC: 0.91})
    # Once MLflow's retries are spent (a 5xx is tried 3 times here), the registry answers again: the old code
    # took the failed read for "no champion" and promoted the worse model.
    times = 3 if status >= 500 else 1
    mlflow_proxy.fault = _first_registry_reads(times, status, body)
    with pytest.raises(
        TrackingServerError,
        match=rf"MLflow failed while reading alias 'champion' of {model_name} \({code}\): .*{status}.*"
        r"check the MLflow connection's credentials and the server's health\. Nothing is promoted on doubt",
    ):
        evaluate(mlflow_proxy.url, worse, model_name)
    assert len(mlflow_proxy.answered) == times
    assert champion(tracking_uri, model_name) == ("1", first)
    assert "ec2_trainer.promotion" not in tags_of(tracking_uri, worse)


def test_an_auth_error_on_the_run_is_not_reported_as_a_missing_run(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy
) -> None:
    run_id = finished_run({METRIC: 0.95}, with_model=False)
    mlflow_proxy.fault = lambda method, path: (403, "Permission denied") if "/runs/get" in path else None
    with pytest.raises(TrackingServerError, match=rf"MLflow failed while reading run {run_id} \(PERMISSION_DENIED\)"):
        evaluate(mlflow_proxy.url, run_id, model_name)


def test_a_failed_alias_move_retries_onto_the_same_version(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = finished_run({METRIC: 0.95})
    mlflow_proxy.fault = (
        lambda method, path: (502, "Bad Gateway") if path.endswith("/registered-models/alias") else None
    )
    with pytest.raises(TrackingServerError, match=rf"MLflow failed while moving alias 'champion' of {model_name}"):
        evaluate(mlflow_proxy.url, run_id, model_name)
    client = MlflowClient(tracking_uri=tracking_uri)
    assert client.get_registered_model(model_name).aliases == {}
    lease = client.get_model_version(model_name, "1").tags[CONTENDER_TAG]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lease) and contends_until(lease) > time.time()
    mlflow_proxy.fault = None
    result = evaluate(mlflow_proxy.url, run_id, model_name)  # the task's retry
    assert (result.promoted, result.model_version) == (True, "1")
    assert [v.version for v in client.search_model_versions(f"name = '{model_name}'")] == ["1"]
    assert tags_of(tracking_uri, run_id)["ec2_trainer.promotion"] == "promoted"


def test_a_retry_after_the_alias_moved_reports_the_promotion(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = finished_run({METRIC: 0.95})
    mlflow_proxy.fault = lambda method, path: (500, "Internal Server Error") if path.endswith("/runs/set-tag") else None
    with pytest.raises(TrackingServerError, match=rf"MLflow failed while tagging run {run_id} \(INTERNAL_ERROR\)"):
        evaluate(mlflow_proxy.url, run_id, model_name)
    assert champion(tracking_uri, model_name) == ("1", run_id)
    mlflow_proxy.fault = None
    result = evaluate(mlflow_proxy.url, run_id, model_name)  # the task's retry
    assert (result.promoted, result.model_version, result.reason) == (
        True,
        "1",
        "0.9500 already holds the alias: an earlier try promoted it",
    )
    assert float(MlflowClient(tracking_uri=tracking_uri).get_model_version(model_name, "1").tags[ALIAS_MOVED_TAG]) > 0
    assert tags_of(tracking_uri, run_id)["ec2_trainer.promotion"] == "promoted"


def test_an_alias_moved_by_hand_onto_the_run_is_not_counted_as_a_promotion(tracking_uri: str, model_name: str) -> None:
    """'Already holds the alias' is trusted only with the gate's own record of moving it (issue 19)."""
    import mlflow
    from mlflow import MlflowClient

    run_id = finished_run({METRIC: 0.95})
    client = MlflowClient(tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(f"runs:/{run_id}/model", model_name).version
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)  # by hand, as in the UI

    result = evaluate(tracking_uri, run_id, model_name)

    assert (result.promoted, result.reason) == (
        False,
        "0.9500 holds the alias, but the gate never moved it there (by hand?): not counted as a promotion",
    )
    assert tags_of(tracking_uri, run_id)["ec2_trainer.promotion"] == "not_promoted"
    assert ALIAS_MOVED_TAG not in client.get_model_version(model_name, version).tags


def _stale_alias_reads(answer: tuple[int, str]) -> Any:
    """A stale cache or stripping proxy: every read of the registered model or of its alias gets `answer`."""

    def fault(method: str, path: str) -> tuple[int, str] | None:
        stale = "/registered-models/get" in path or "/registered-models/alias" in path
        return answer if method == "GET" and stale else None

    return fault


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param((200, "{}"), id="200-without-the-alias"),
        pytest.param((200, '{"model_version": {"name": "m", "aliases": []}}'), id="200-version-without-a-number"),
    ],
)
def test_a_stale_alias_read_fails_the_gate_and_never_promotes_a_worse_model(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    first = finished_run({METRIC: 0.95})
    assert evaluate(tracking_uri, first, model_name).promoted
    worse = finished_run({METRIC: 0.91})
    mlflow_proxy.fault = _stale_alias_reads(answer)
    with pytest.raises(TrackingServerError, match=r"without a version: check the server and any proxy or cache"):
        evaluate(mlflow_proxy.url, worse, model_name)
    assert champion(tracking_uri, model_name) == ("1", first)
    assert "ec2_trainer.promotion" not in tags_of(tracking_uri, worse)


def test_an_alias_read_that_says_none_never_moves_it_below_the_best_registered_version(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy
) -> None:
    from mlflow import MlflowClient

    first = finished_run({METRIC: 0.95})
    assert evaluate(tracking_uri, first, model_name).promoted
    # The champion's contender lease has run out: only the registry's versions can show it is better.
    MlflowClient(tracking_uri=tracking_uri).set_model_version_tag(model_name, "1", CONTENDER_TAG, "0")
    worse = finished_run({METRIC: 0.91})
    missing = '{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "stale: no such model"}'
    mlflow_proxy.fault = _stale_alias_reads((404, missing))
    result = evaluate(mlflow_proxy.url, worse, model_name)
    assert (result.promoted, result.model_version, result.reason) == (
        False,
        None,
        f"0.9100 does not beat {model_name} version 1's 0.9500, the best registered",
    )
    assert champion(tracking_uri, model_name) == ("1", first)


def test_a_tie_with_the_champion_does_not_displace_it(tracking_uri: str, model_name: str) -> None:
    first = finished_run({METRIC: 0.95})
    assert evaluate(tracking_uri, first, model_name).promoted
    tied = finished_run({METRIC: 0.95})
    result = evaluate(tracking_uri, tied, model_name)
    assert (result.promoted, result.model_version, result.reason) == (
        False,
        None,
        "0.9500 does not beat the current champion's 0.9500",
    )
    assert champion(tracking_uri, model_name) == ("1", first)


# ---- concurrent evaluations


def _race(barrier: threading.Barrier, uri: str, run_id: str, model_name: str) -> Evaluation:
    barrier.wait(timeout=60)  # start together: the proxy's random delays then choose the interleaving
    return evaluate(uri, run_id, model_name)


def test_concurrent_evaluations_leave_the_best_model_champion(tracking_uri: str, mlflow_proxy: FaultProxy) -> None:
    """Two or three evaluations at once, through a proxy that delays every request at random, many times over."""
    scores = {finished_run({METRIC: value}): value for value in (0.91, 0.93, 0.95, 0.97)}
    mlflow_proxy.max_delay_s = 0.05
    for round_ in range(10):
        rng = random.Random(round_)
        model_name = f"race-{round_}-{uuid.uuid4().hex[:6]}"
        racers = rng.sample(sorted(scores), rng.choice((2, 3)))
        entered = list(racers)
        if rng.random() < 0.4:  # a champion already in place, which the racers must beat
            entered.append(rng.choice([run_id for run_id in scores if run_id not in racers]))
            assert evaluate(tracking_uri, entered[-1], model_name).promoted
        barrier = threading.Barrier(len(racers))
        with ThreadPoolExecutor(len(racers)) as pool:
            futures = {run_id: pool.submit(_race, barrier, mlflow_proxy.url, run_id, model_name) for run_id in racers}
            results = {run_id: future.result(timeout=300) for run_id, future in futures.items()}
        holder = champion(tracking_uri, model_name)[1]
        best = max(entered, key=scores.__getitem__)
        assert holder == best, f"round {round_}: {scores[holder]} holds the alias, {scores[best]} was evaluated"
        # A racer that held the alias when it checked may say it won and lose it later to a better one, as if
        # they had run one after the other; the best one must say it won.
        assert best not in racers or results[best].promoted, f"round {round_}: the best racer says it lost"


# ---- the evaluate step: which errors retry


def _step_settings(tracking_uri: str, model_name: str) -> Settings:
    from orchestrator.config.resolve import settings_of
    from orchestrator.config.settings import load_settings

    config = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"}).to_dict()
    config["mlflow"] |= {"tracking_uri": tracking_uri, "model_name": model_name, "conn_id": "no_such_connection"}
    return settings_of(config)


def test_the_evaluate_step_fails_without_retry_only_when_nothing_can_be_compared(
    tracking_uri: str, model_name: str, mlflow_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.tracking import promotion

    unscored = finished_run({"val_accuracy": 0.99}, with_model=False)
    with pytest.raises(AirflowFailException, match=r"has no metric 'test_accuracy'"):
        promotion.evaluate(_step_settings(tracking_uri, model_name), unscored, promote=True)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_proxy.fault = lambda method, path: (401, UNAUTHENTICATED) if "/runs/get" in path else None
    with pytest.raises(TrackingServerError, match=r"reading run .* \(UNAUTHENTICATED\)"):  # the task's retries apply
        promotion.evaluate(_step_settings(mlflow_proxy.url, model_name), unscored, promote=True)


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_a_run_its_job_left_running_is_ended_as_told(tracking_uri: str, status: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = f"left-{uuid.uuid4().hex[:8]}"
    left = start_training_run(tracking_uri, experiment, _tracked("manual__1", 1), gate_metric=METRIC)
    end_run_if_running(tracking_uri, left, status)
    assert client.get_run(left).info.status == status
    finished = finished_run({METRIC: 0.5}, with_model=False)
    end_run_if_running(tracking_uri, finished, status)
    assert client.get_run(finished).info.status == "FINISHED"


def test_marking_a_left_run_failed_never_hides_the_training_failure(
    tracking_uri: str, mlflow_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    left = start_training_run(
        tracking_uri, f"down-{uuid.uuid4().hex[:8]}", _tracked("manual__1", 1), gate_metric=METRIC
    )
    # 403: MLflow's client does not retry it (a 5xx would be retried with backoff for minutes).
    mlflow_proxy.fault = lambda method, path: (403, "Permission denied") if "/runs/" in path else None
    end_run_if_running(mlflow_proxy.url, left, "FAILED")  # no exception: the caller reports the training's own failure
    assert f"Could not end MLflow run {left} as FAILED" in caplog.text
    assert MlflowClient(tracking_uri=tracking_uri).get_run(left).info.status == "RUNNING"


class _TagRaceClient:
    """A registry whose tag write loses a race (MLflow's insert-or-update failing on the unique key, as a concurrent
    evaluation's write makes it) and whose version holds `tags` when read after it."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def set_model_version_tag(self, *args: Any) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        raise MlflowException("UNIQUE constraint failed: model_version_tags.key", error_code=BAD_REQUEST)

    def get_model_version(self, name: str, version: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(tags=self.tags)


def test_a_concurrent_evaluation_recording_the_same_move_is_not_a_failure() -> None:
    from orchestrator.tracking.promotion import _record_the_move

    _record_the_move(_TagRaceClient({ALIAS_MOVED_TAG: "1796582751"}), "cnn", "3")
    # No record after the failed write: the failure is real, and the step retries.
    with pytest.raises(TrackingServerError, match="tagging cnn version 3 \\(BAD_REQUEST\\)"):
        _record_the_move(_TagRaceClient({}), "cnn", "3")
