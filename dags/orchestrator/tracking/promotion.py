"""Deciding whether a finished run's model becomes the champion, and moving the alias.

Concurrent evaluations (up to one per DAG run) settle the champion alias without a lock: each one that passes the
gate registers its version tagged as a contender for a lease, then moves the alias to the best of the live
contenders and the current champion, and re-reads until a read finds the alias already there. The evaluation that
checks last has seen every contender and every write, so the best one holds the alias whatever the interleaving
(docs/decisions/0034-*.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orchestrator.contracts import (
    ALIAS_MOVED_TAG,
    CONTENDER_TAG,
    DAG_RUN_ID_TAG,
    LEFT_TO_SWEEP,
    PROMOTION_REASON_TAG,
    PROMOTION_TAG,
)
from orchestrator.contracts_steps import Evaluation
from orchestrator.errors import fail_without_retry
from orchestrator.tracking.pages import all_pages
from orchestrator.tracking.runs import (
    TrackingError,
    TrackingServerError,
    mlflow_call,
    mlflow_output_logged,
    server_error,
)
from orchestrator.tracking.views import experiment_url

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)


CHAMPION_ALIAS = "champion"


CONTEST_LEASE_S = 1800.0


# An evaluation that has not settled the alias this long after registering stops writing and fails (then retries):
# far below the lease, so contenders that a late write overlooked are still live when someone checks again.
CONTEST_BUDGET_S = 300.0


_CONTEST_ROUNDS = 100  # a round writes only after a newer registration: 32 concurrent runs settle in far fewer


_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"  # MLflow's own JSON error code; a bare HTTP 404 maps to ENDPOINT_NOT_FOUND


# mlflow.register_model reads the process-wide tracking URI: threads of one process take turns at changing it.
_GLOBAL_URI_LOCK = threading.Lock()


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


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


def evaluate_and_promote(
    tracking_uri: str,
    run_id: str,
    *,
    model_name: str,
    metric: str,
    threshold: float,
    greater_is_better: bool,
    ui_base_url: str,
    model_artifact: str = "model",
    promote: bool = True,
) -> Evaluation:
    """Gate the run's model on `metric`; register it and move the champion alias only when it wins.

    The registered model's description says what it is, how a version becomes champion and where the training
    runs are (their runs table, under `ui_base_url`).

    `promote` False (a sweep's run): the verdict is computed and logged, nothing is registered or moved.
    Raises TrackingError when the run or the champion cannot be compared, TrackingServerError on any other
    MLflow error: nothing is promoted on doubt.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = _get_run(client, run_id, f"MLflow run {run_id} not found on {tracking_uri}")
    if run.info.status != "FINISHED":
        raise TrackingError(f"MLflow run {run_id} is {run.info.status}, not FINISHED: nothing to evaluate")
    if metric not in run.data.metrics:
        raise TrackingError(
            f"MLflow run {run_id} has no metric {metric!r} (it has {sorted(run.data.metrics)}): "
            "check mlflow.metric against what the training job logs"
        )
    value = float(run.data.metrics[metric])

    champion = _champion(client, model_name, metric)
    champion_value = champion.value if champion else None
    best = _best_registered(client, model_name, metric, greater_is_better=greater_is_better, other_than=run_id)
    below_best = best is not None and (champion is None or _beats(best.value, champion.value, greater_is_better))
    holds_alias = champion is not None and champion.run_id == run_id and not below_best
    if holds_alias and champion is not None and _moved_by_the_gate(client, model_name, champion.version):
        # An earlier try moved the alias and failed after it: that try's decision stands.
        decision = PromotionDecision(True, f"{value:.4f} already holds the alias: an earlier try promoted it")
    elif holds_alias:
        decision = PromotionDecision(
            False,
            f"{value:.4f} holds the alias, but the gate never moved it there (by hand?): not counted as a promotion",
        )
    elif below_best and best is not None and not _beats(value, best.value, greater_is_better):
        # The alias read may be stale or moved by hand: never promote below the best registered version.
        decision = PromotionDecision(
            False,
            f"{value:.4f} does not beat {model_name} version {best.version}'s {best.value:.4f}, the best registered",
        )
    else:
        decision = decide_promotion(value, threshold, champion_value, greater_is_better=greater_is_better)
    promoted, reason, version = decision.promote, decision.reason, None
    if not promote:
        promoted, reason = False, f"{reason}; left to the sweep, which gates its best run only"
    elif decision.promote:
        started = time.monotonic()
        version = _register_contender(client, tracking_uri, run_id, model_name, model_artifact)
        experiment = mlflow_call(
            f"reading experiment {run.info.experiment_id}", client.get_experiment, run.info.experiment_id
        )
        _describe_model(
            client,
            model_name,
            model_description(
                metric,
                threshold,
                greater_is_better=greater_is_better,
                experiment=experiment.name,
                runs_url=experiment_url(ui_base_url, experiment.experiment_id),
            ),
        )
        holder = _settle_champion(client, model_name, metric, greater_is_better=greater_is_better, started=started)
        promoted = holder.version == version
        if not promoted:
            reason = (
                f"{value:.4f} passed the gate as version {version}, but version {holder.version} "
                f"({holder.value:.4f}), evaluated at the same time, holds the champion alias"
            )
        _describe_version(client, model_name, version, run, f"{metric} {reason}")
    log.info(
        "Run %s: %s (%s version %s): %s",
        run_id,
        "champion" if promoted else "not promoted",
        model_name,
        version or "not registered",
        reason,
    )
    outcome = "promoted" if promoted else "not_promoted" if promote else LEFT_TO_SWEEP
    mlflow_call(f"tagging run {run_id}", client.set_tag, run_id, PROMOTION_TAG, outcome)
    mlflow_call(f"tagging run {run_id}", client.set_tag, run_id, PROMOTION_REASON_TAG, reason)
    return Evaluation(run_id, metric, value, champion_value, promoted, reason, version)


@dataclass(frozen=True)
class _Scored:
    """A registered version and its run's score on the gating metric."""

    version: str
    value: float
    run_id: str


def _get_run(client: Any, run_id: str, missing: str) -> Any:
    """The run; one that MLflow says does not exist is a TrackingError with the message `missing`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == _DOES_NOT_EXIST:
            raise TrackingError(f"{missing}: {exc.message}") from exc
        raise server_error(exc, f"reading run {run_id}") from exc


def _scored(client: Any, model_name: str, version: str, metric: str) -> _Scored:
    """A registered version's score: its run's `metric`. A version without one cannot be compared: TrackingError."""
    what = f"{model_name} version {version}"
    model_version = mlflow_call(f"reading {what}", client.get_model_version, model_name, version)
    if not model_version.run_id:
        raise TrackingError(
            f"{what} has no MLflow run, so no {metric!r} to compare with: move alias {CHAMPION_ALIAS!r} to a "
            "version registered from a run"
        )
    run = _get_run(client, model_version.run_id, f"{what}'s run {model_version.run_id} is gone")
    if metric not in run.data.metrics:
        raise TrackingError(
            f"{what}'s run {model_version.run_id} has no metric {metric!r}, so no model can be shown to beat it: "
            f"log {metric!r} on that run, or move alias {CHAMPION_ALIAS!r} to a version whose run has it "
            "(deleting the alias leaves the best registered version with the metric as the one to beat)"
        )
    return _Scored(str(version), float(run.data.metrics[metric]), model_version.run_id)


def _champion(client: Any, model_name: str, metric: str) -> _Scored | None:
    """The champion and its score, read by alias. None only when MLflow says the registered model or the alias does
    not exist: any other answer, an answer without a version included (a stale cache, a stripping proxy), is an error
    (the step retries), never "no champion"."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        # MLflow says a missing alias with INVALID_PARAMETER_VALUE: only its own words mean "none".
        missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and exc.message.endswith(
            f"alias {CHAMPION_ALIAS} not found."
        )
        if exc.error_code == _DOES_NOT_EXIST or missing_alias:
            return None
        raise server_error(exc, f"reading alias {CHAMPION_ALIAS!r} of {model_name}") from exc
    if version is None or not getattr(version, "version", None):
        raise TrackingServerError(
            f"MLflow answered the read of alias {CHAMPION_ALIAS!r} of {model_name} without a version: check the "
            "server and any proxy or cache in front of it. Nothing is promoted on doubt: the step fails and retries"
        )
    return _scored(client, model_name, str(version.version), metric)


def _best_registered(
    client: Any, model_name: str, metric: str, *, greater_is_better: bool, other_than: str = ""
) -> _Scored | None:
    """The best-scoring registered version whose run has `metric` (earliest on a tie), other than run `other_than`'s:
    the alias never moves below it, whatever a read of the alias says. Versions without a run or the metric are not
    comparable: left out."""
    from mlflow.exceptions import MlflowException

    best: _Scored | None = None
    for found in sorted(_versions(client, model_name), key=lambda v: int(v.version)):
        if not found.run_id or found.run_id == other_than:
            continue
        try:
            run = client.get_run(found.run_id)
        except MlflowException as exc:
            if exc.error_code == _DOES_NOT_EXIST:
                continue
            raise server_error(exc, f"reading run {found.run_id}") from exc
        if metric in run.data.metrics:
            scored = _Scored(str(found.version), float(run.data.metrics[metric]), found.run_id)
            if best is None or _beats(scored.value, best.value, greater_is_better):
                best = scored
    return best


def _moved_by_the_gate(client: Any, model_name: str, version: str) -> bool:
    """Whether the gate's own record says it moved the alias onto `version`."""
    found = mlflow_call(f"reading {model_name} version {version}", client.get_model_version, model_name, version)
    return ALIAS_MOVED_TAG in (found.tags or {})


def _record_the_move(client: Any, model_name: str, version: str) -> None:
    """The gate's record on `version`, written before the alias moves there. Concurrent evaluations settling the same
    champion write it at once, and MLflow's insert-or-update then fails one of them on the tag's unique key: the
    other's record serves, so that failure is one only when no record is there."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_model_version_tag(model_name, version, ALIAS_MOVED_TAG, f"{time.time():.0f}")
    except MlflowException as exc:
        if not _moved_by_the_gate(client, model_name, version):
            raise server_error(exc, f"tagging {model_name} version {version}") from exc


def _beats(a: float, b: float, greater_is_better: bool) -> bool:
    """Strictly better: a tie never displaces."""
    return a > b if greater_is_better else a < b


def contender_lease_until(now: float) -> str:
    """CONTENDER_TAG's value: when a lease taken at `now` (epoch seconds) runs out, ISO 8601 UTC to the second."""
    return datetime.fromtimestamp(now + CONTEST_LEASE_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def contends_until(value: str | None) -> float:
    """CONTENDER_TAG's value as epoch seconds: the ISO form, or the epoch number written before it (registries keep
    it); 0.0 (no lease) when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        log.warning("%s %r is neither a date-time nor epoch seconds: not counted as a lease", CONTENDER_TAG, value)
        return 0.0


def model_description(metric: str, threshold: float, *, greater_is_better: bool, experiment: str, runs_url: str) -> str:
    """The registered model's description: what it is, how a version becomes champion, where its runs are."""
    better = "higher" if greater_is_better else "lower"
    return (
        "Hurricane-damage classifier: a PyTorch CNN labelling 128x128 satellite images `damage` or `no_damage`, "
        "trained on ephemeral EC2 instances by the ec2_training Airflow DAG (ec2-trainer). A run whose model passes "
        f"the gate is registered as a version; the `{CHAMPION_ALIAS}` alias moves to it only when its `{metric}` "
        f"reaches {threshold:g} ({better} is better) and beats the current champion's (a tie keeps the champion). "
        f"Each version's description names its run, commit and the gate's reason. Training runs: MLflow experiment "
        f"`{experiment}`, {runs_url}"
    )


def _describe_model(client: Any, model_name: str, description: str) -> None:
    """Write the registered model's description where it differs (settings change the gate)."""
    found = mlflow_call(f"reading {model_name}", client.get_registered_model, model_name)
    if found.description != description:
        mlflow_call(f"describing {model_name}", client.update_registered_model, model_name, description=description)


def _register_contender(client: Any, tracking_uri: str, run_id: str, model_name: str, model_artifact: str) -> str:
    """The run's model version, registered (or found, on a retry) and tagged as a contender for the lease."""
    until = contender_lease_until(time.time())
    earlier = mlflow_call(
        f"searching {model_name} for run {run_id}",
        client.search_model_versions,
        f"name = '{model_name}' and run_id = '{run_id}'",
    )
    if earlier:
        version = str(min(int(found.version) for found in earlier))
        mlflow_call(
            f"tagging {model_name} version {version}",
            client.set_model_version_tag,
            model_name,
            version,
            CONTENDER_TAG,
            until,
        )
        return version
    with _global_tracking_uri(tracking_uri), mlflow_output_logged():
        import mlflow

        registered = mlflow_call(
            f"registering run {run_id} as {model_name}",
            mlflow.register_model,
            _model_source(client, run_id, model_artifact),
            model_name,
            tags={CONTENDER_TAG: until},
        )
    return str(registered.version)


def _model_source(client: Any, run_id: str, model_artifact: str) -> str:
    """The model's URI to register. MLflow 3 keeps a logged model apart from its run's artifacts: registering
    runs:/<run>/model warns (a WARNING line in evaluate's log on every success) and falls back to models:/<id>, so
    that is asked for; runs:/ stays for a run logged before MLflow 3."""
    run = mlflow_call(f"reading run {run_id}", client.get_run, run_id)
    for output in getattr(run.outputs, "model_outputs", None) or ():
        logged = mlflow_call(f"reading model {output.model_id}", client.get_logged_model, output.model_id)
        if logged.name == model_artifact:
            return f"models:/{output.model_id}"
    return f"runs:/{run_id}/{model_artifact}"


def _describe_version(client: Any, model_name: str, version: str, run: Any, reason: str) -> None:
    """Say on the registered version where it comes from and what the gate decided, in the registry's own view."""
    tags = run.data.tags
    commit = tags.get("mlflow.source.git.commit") or tags.get("git_sha") or "unknown"
    dag_run = tags.get(DAG_RUN_ID_TAG)
    description = f"Trained by MLflow run {run.info.run_id} from commit {commit}"
    description += f" (Airflow run {dag_run})" if dag_run else ""
    description += f". Gate: {reason}."
    what = f"{model_name} version {version}"
    mlflow_call(f"describing {what}", client.update_model_version, model_name, version, description=description)
    version_tags = {"run_id": run.info.run_id, "git_commit": commit, "gate_reason": reason}
    if dag_run:
        version_tags[DAG_RUN_ID_TAG] = dag_run
    for key, value in version_tags.items():
        mlflow_call(f"tagging {what}", client.set_model_version_tag, model_name, version, key, value)


def _versions(client: Any, model_name: str) -> list[Any]:
    """Every registered version of `model_name`, all pages."""
    return list(
        all_pages(
            lambda token: mlflow_call(
                f"listing the versions of {model_name}",
                client.search_model_versions,
                f"name = '{model_name}'",
                page_token=token,
            )
        )
    )


def _live_contenders(client: Any, model_name: str, metric: str) -> list[_Scored]:
    """The versions whose contender lease has not run out, oldest first, with their scores."""
    now = time.time()
    found = _versions(client, model_name)
    live = sorted(int(version.version) for version in found if contends_until(version.tags.get(CONTENDER_TAG)) > now)
    return [_scored(client, model_name, str(version), metric) for version in live]


def _settle_champion(client: Any, model_name: str, metric: str, *, greater_is_better: bool, started: float) -> _Scored:
    """Move the alias until a fresh read finds it on the best of the live contenders and the current champion.

    Contenders are read before the alias, and only a read that finds nothing to change ends the loop: so the
    evaluation that checks last has seen every registration and every write, and the alias it leaves is the best.
    """
    for _ in range(_CONTEST_ROUNDS):
        contenders = _live_contenders(client, model_name, metric)
        current = _champion(client, model_name, metric)
        floor = _best_registered(client, model_name, metric, greater_is_better=greater_is_better)
        best = current
        # Ties keep the champion, then the earliest version: every reader agrees. The best registered version
        # comes last: the alias never moves below it, even when a read of the alias says there is none.
        for candidate in [*contenders, floor]:
            if candidate is not None and (best is None or _beats(candidate.value, best.value, greater_is_better)):
                best = candidate
        if best is None:
            raise TrackingError(f"{model_name} has no champion and no live contender: was its new version deleted?")
        if current is not None and current.version == best.version:
            return current
        if time.monotonic() - started > CONTEST_BUDGET_S:
            raise TrackingServerError(
                f"the champion alias of {model_name} is not settled after {CONTEST_BUDGET_S:.0f} s: the MLflow "
                "server is slow or overloaded; the step retries, and its version stays a contender meanwhile"
            )
        # The record first: a retry after the move trusts the alias only with it.
        _record_the_move(client, model_name, best.version)
        mlflow_call(
            f"moving alias {CHAMPION_ALIAS!r} of {model_name}",
            client.set_registered_model_alias,
            model_name,
            CHAMPION_ALIAS,
            best.version,
        )
        log.info(
            "Alias %r of %s moved to version %s (%s %.4f)", CHAMPION_ALIAS, model_name, best.version, metric, best.value
        )
    raise TrackingServerError(
        f"the champion alias of {model_name} kept moving for {_CONTEST_ROUNDS} rounds; the step retries"
    )


@contextlib.contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """`mlflow.register_model` only uses the process-wide tracking URI: set it for the call, then put it back."""
    import mlflow

    with _GLOBAL_URI_LOCK:
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


def evaluate(s: Settings, mlflow_run_id: str, *, promote: bool) -> Evaluation:
    """Gate the run's model; a run or champion that cannot be compared fails at once, any other MLflow error retries.

    A sweep's run (promote false) only logs the verdict: the sweep gates its best run (orchestrator.sweeps)."""
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.promotion import evaluate_and_promote
    from orchestrator.tracking.runs import credentials_in_env

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password), fail_without_retry():
        return evaluate_and_promote(
            s.mlflow.tracking_uri,
            mlflow_run_id,
            model_name=s.mlflow.model_name,
            metric=s.mlflow.metric,
            threshold=s.mlflow.threshold,
            greater_is_better=s.mlflow.greater_is_better,
            ui_base_url=s.mlflow.ui_base_url,
            promote=promote,
        )
