"""The body of each step of the sweep DAG: plain functions over the sweep's settings, called by thin Airflow tasks.

Every set runs as a whole ec2_training DAG run (CI gate, launch pool and instance cap, its own instance, host key and
job, teardown), nested in MLflow under the sweep's parent run and told not to promote; the sweep gates its best set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestrator.config.resolve import resolve_config
from orchestrator.config.run_params import BY_NAME
from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import SET_RUN_ID
from orchestrator.errors import fail_without_retry
from orchestrator.sweeps.outcome import SetOutcome, best_set, summary
from orchestrator.sweeps.sets import SWEEP_KEYS, describe, expand_sets, refuse_duplicates

log = logging.getLogger(__name__)


def resolve_sweep(params: Mapping[str, Any]) -> dict[str, Any]:
    """The deployment's config for the sweep's ref, and the validated sets; fails before anything is spent."""
    with fail_without_retry():
        config = resolve_config({"git_ref": params.get("git_ref")})
        sets = expand_sets(params.get("sets"), params.get("grid"))
        # Each set as its run will resolve it: a value the settings refuse, or two sets that come to the same
        # values (one spelling the configured value), fail here rather than in a run of their own.
        refuse_duplicates([_job_values(load_settings(values)) for values in sets])
    for number, values in enumerate(sets, start=1):
        log.info("Set %d of %d: %s", number, len(sets), describe(values))
    return {"config": config, "sets": list(sets)}


def start_sweep(
    s: Settings, sets: Sequence[Mapping[str, Any]], git_sha: str, dag_id: str, run_id: str
) -> list[dict[str, Any]]:
    """Create the parent MLflow run, then one trigger per set: its ec2_training run id, conf (which names the
    parent run) and note."""
    from orchestrator.sweeps.parent_run import start_parent_run

    with _mlflow_login(s):
        parent = start_parent_run(s, git_sha, dag_id, run_id, sets)
    log.info("MLflow run %s is the sweep's parent; %d sets of commit %s", parent, len(sets), git_sha)
    return [
        {
            # Fixed per set, so a retried trigger finds the run it created.
            "trigger_run_id": SET_RUN_ID.format(run_id=run_id, number=number),
            # The sha, not the ref: every set trains the commit this sweep's CI gate passed.
            "conf": {**values, "git_ref": git_sha, "mlflow_parent_run_id": parent, "promote": "false"},
            "note": f"set {number} of {len(sets)} of sweep {run_id}: {describe(values)}",
        }
        for number, values in enumerate(sets, start=1)
    ]


def parent_run_of(children: Sequence[Mapping[str, Any]]) -> str:
    return str(children[0]["conf"]["mlflow_parent_run_id"])


def outcomes(
    s: Settings,
    children: Sequence[Mapping[str, Any]],
    state_of: Callable[[str], str],
    *,
    with_metrics: bool,
) -> list[SetOutcome]:
    """Each set's DAG run state, and (with_metrics) its MLflow run and gating metric."""
    from orchestrator.sweeps.parent_run import child_runs

    runs = {}
    if with_metrics:
        with _mlflow_login(s):
            runs = child_runs(s.mlflow.tracking_uri, parent_run_of(children))
    found = []
    for number, child in enumerate(children, start=1):
        run_id = child["trigger_run_id"]
        run = runs.get(run_id)
        params = {k: v for k, v in child["conf"].items() if k in SWEEP_KEYS}
        found.append(
            SetOutcome(
                number,
                params,
                run_id,
                state_of(run_id),
                run.run_id if run else None,
                run.status if run else None,
                run.metrics.get(s.mlflow.metric) if run else None,
            )
        )
    return found


def gate_best(s: Settings, children: Sequence[Mapping[str, Any]], state_of: Callable[[str], str]) -> dict[str, Any]:
    """Run the champion gate on the best successful set only (the sets' own evaluate only logged a verdict)."""
    from orchestrator.sweeps.parent_run import BEST_RUN_TAG
    from orchestrator.tracking.promotion import evaluate_and_promote

    sets = outcomes(s, children, state_of, with_metrics=True)
    for outcome in sets:
        log.info(
            "%s: ec2_training run %s %s; MLflow run %s %s, %s = %s",
            outcome.label,
            outcome.dag_run_id,
            outcome.state,
            outcome.mlflow_run_id or "-",
            outcome.mlflow_status or "-",
            s.mlflow.metric,
            outcome.value,
        )
    best = best_set(sets, greater_is_better=s.mlflow.greater_is_better)
    if best is None or best.mlflow_run_id is None:
        log.warning("No set succeeded: nothing to gate, the champion stays")
        return {"best_set": None}
    log.info("Best: %s, MLflow run %s, %s = %s", best.label, best.mlflow_run_id, s.mlflow.metric, best.value)
    with _mlflow_login(s), fail_without_retry():
        result = evaluate_and_promote(
            s.mlflow.tracking_uri,
            best.mlflow_run_id,
            model_name=s.mlflow.model_name,
            metric=s.mlflow.metric,
            threshold=s.mlflow.threshold,
            greater_is_better=s.mlflow.greater_is_better,
            ui_base_url=s.mlflow.ui_base_url,
        )
        _tag(s, parent_run_of(children), {BEST_RUN_TAG: best.mlflow_run_id})
    return {"best_set": best.number, "best_run_id": best.mlflow_run_id, "evaluation": result.to_xcom()}


def summarize(
    s: Settings | None,
    children: Sequence[Mapping[str, Any]] | None,
    gated: Mapping[str, Any] | None,
    state_of: Callable[[str], str],
) -> str:
    """End the parent run with the sweep's summary (outcome.summary: the verdict, the best set and its metric, the
    gate's decision, the parent run's page); fail with it, saying how many sets failed and which, unless all passed.
    `s` and `children` are None when the step that gives them failed."""
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.sweeps.parent_run import VERDICT_TAG, end_parent_run
    from orchestrator.tracking.runs import experiment_id_of
    from orchestrator.tracking.views import run_url

    if not children or s is None:
        raise AirflowFailException("the sweep started no set: the task that failed before start_sweep says why")
    parent = parent_run_of(children)
    sets = outcomes(s, children, state_of, with_metrics=True)
    with _mlflow_login(s):
        page = run_url(s.mlflow.ui_base_url, experiment_id_of(s.mlflow.tracking_uri, parent), parent)
        ok, sentence = summary(
            sets, gated, metric=s.mlflow.metric, greater_is_better=s.mlflow.greater_is_better, parent_url=page
        )
        end_parent_run(s.mlflow.tracking_uri, parent, ok=ok, tags={VERDICT_TAG: sentence})
    if not ok:
        raise AirflowFailException(sentence)
    log.info("Sweep: %s", sentence)
    return sentence


def _job_values(s: Settings) -> dict[str, Any]:
    """The values a run of these settings passes to the job for the knobs a sweep may vary."""
    values = {}
    for key in SWEEP_KEYS:
        section, name = BY_NAME[key].setting.split(".")
        values[key] = getattr(getattr(s, section), name)
    return values


def _mlflow_login(s: Settings) -> Any:
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env

    creds = mlflow_credentials(s.mlflow.conn_id)
    return credentials_in_env(creds.username, creds.password)


def _tag(s: Settings, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.mlflow.tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
