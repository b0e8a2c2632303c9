"""orchestrator.tracking: the promotion rule (pure) and evaluate_and_promote against a real MLflow server."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.mlflow_server import MlflowServer
from orchestrator.tracking import (
    CHAMPION_ALIAS,
    EvaluationResult,
    TrackingError,
    credentials_in_env,
    decide_promotion,
    evaluate_and_promote,
)

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


def evaluate(tracking_uri: str, run_id: str, model_name: str, **overrides: Any) -> EvaluationResult:
    kwargs: dict[str, Any] = {"metric": METRIC, "threshold": 0.9, "greater_is_better": True} | overrides
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
    assert result.to_dict()["run_id"] == first

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


def test_below_threshold_registers_nothing(tracking_uri: str, model_name: str) -> None:
    from mlflow import MlflowClient

    run_id = finished_run({METRIC: 0.5}, with_model=False)
    result = evaluate(tracking_uri, run_id, model_name)
    assert not result.promoted
    assert "does not reach the threshold" in tags_of(tracking_uri, run_id)["ec2_trainer.promotion_reason"]
    assert MlflowClient(tracking_uri=tracking_uri).search_registered_models(f"name = '{model_name}'") == []


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
