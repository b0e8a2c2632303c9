"""Reading a finished training run from MLflow and deciding whether its model becomes the champion."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.errors import OrchestratorError

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"


class TrackingError(OrchestratorError):
    """The MLflow run is missing, unfinished or lacks the gating metric."""


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class EvaluationResult:
    run_id: str
    metric: str
    value: float
    champion_value: float | None
    promoted: bool
    reason: str
    model_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_promotion(
    value: float, threshold: float, champion_value: float | None, *, greater_is_better: bool
) -> PromotionDecision:
    """Promote only a model that passes the threshold and beats the current champion (ties keep the champion)."""

    def better(a: float, b: float) -> bool:
        return a > b if greater_is_better else a < b

    word = "above" if greater_is_better else "below"
    if not (better(value, threshold) or value == threshold):
        return PromotionDecision(False, f"{value:.4f} does not reach the threshold {threshold:.4f} ({word} needed)")
    if champion_value is not None and not better(value, champion_value):
        return PromotionDecision(False, f"{value:.4f} does not beat the current champion's {champion_value:.4f}")
    if champion_value is None:
        return PromotionDecision(True, f"{value:.4f} passes the threshold {threshold:.4f}; there is no champion yet")
    return PromotionDecision(
        True, f"{value:.4f} passes the threshold {threshold:.4f} and beats the champion's {champion_value:.4f}"
    )


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


def evaluate_and_promote(
    tracking_uri: str,
    run_id: str,
    *,
    model_name: str,
    metric: str,
    threshold: float,
    greater_is_better: bool,
    model_artifact: str = "model",
) -> EvaluationResult:
    """Gate the run's model on `metric`; register it and move the champion alias only when it wins."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"MLflow run {run_id} not found on {tracking_uri}: {exc.message}") from exc
    if run.info.status != "FINISHED":
        raise TrackingError(f"MLflow run {run_id} is {run.info.status}, not FINISHED: nothing to evaluate")
    if metric not in run.data.metrics:
        raise TrackingError(
            f"MLflow run {run_id} has no metric {metric!r} (it has {sorted(run.data.metrics)}): "
            "check mlflow.metric against what the training job logs"
        )
    value = float(run.data.metrics[metric])

    champion_value = _champion_metric(client, model_name, metric)
    decision = decide_promotion(value, threshold, champion_value, greater_is_better=greater_is_better)
    version: str | None = None
    if decision.promote:
        with _global_tracking_uri(tracking_uri):
            import mlflow

            registered = mlflow.register_model(f"runs:/{run_id}/{model_artifact}", model_name)
        version = str(registered.version)
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        log.info(
            "Registered %s version %s and moved alias %r to it: %s",
            model_name,
            version,
            CHAMPION_ALIAS,
            decision.reason,
        )
    else:
        log.info("Run %s kept but not promoted: %s", run_id, decision.reason)
    client.set_tag(run_id, "ec2_trainer.promotion", "promoted" if decision.promote else "not_promoted")
    client.set_tag(run_id, "ec2_trainer.promotion_reason", decision.reason)
    return EvaluationResult(run_id, metric, value, champion_value, decision.promote, decision.reason, version)


@contextlib.contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """`mlflow.register_model` only uses the process-wide tracking URI: set it for the call, then put it back."""
    import mlflow

    previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def experiment_id_of(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id)


def _champion_metric(client: Any, model_name: str, metric: str) -> float | None:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None  # no registered model or no champion yet
    if not champion.run_id:
        return None
    metrics = client.get_run(champion.run_id).data.metrics
    return float(metrics[metric]) if metric in metrics else None
