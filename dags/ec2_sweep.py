"""Sweep hyperparameters: one ec2_training run per set, compared under one parent MLflow run, the best one gated.

The commit's CI is gated once, before anything is created; then each set runs as a whole ec2_training DAG run (its
own CI gate, launch-pool turn under aws.max_instances, instance, host key, job and teardown), nested in MLflow under
the sweep's run and told not to promote. Once every set has ended, the champion gate runs on the best successful set
only, and `summary` fails when any set failed, saying how many and which. Wiring only: the logic is in
`orchestrator.sweeps`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from orchestrator.ci.gate import CiGateOperator
from orchestrator.config.run_params import BY_NAME, JOB_PARAMS
from orchestrator.config.trigger_form import form_params
from orchestrator.dag_docs import dag_doc
from orchestrator.retries import OUTAGE_RETRIES
from orchestrator.sweeps.operators import SweepSetOperator
from orchestrator.sweeps.sets import EXAMPLE_GRID, EXAMPLE_SETS, MAX_SETS, MIN_SETS

# As in ec2_training, no task takes resolve_sweep's XComArg (it would draw an edge from it to each in the graph): the
# CI gate reads the configuration through templates, the other tasks pull resolve_sweep's value themselves.
CONFIG = "ti.xcom_pull(task_ids='resolve_sweep')['config']"
SWEEP_SECTION = "Sweep"
# Each key's own schema (run_params.py), so the form and the API refuse what a single run would refuse.
SET_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {name: dict(BY_NAME[name].schema) for name in JOB_PARAMS},
}

PARAMS = {
    "git_ref": Param(None, **form_params()["git_ref"]),
    "sets": Param(
        None,
        type=["null", "array"],
        items=SET_SCHEMA,
        minItems=MIN_SETS,
        maxItems=MAX_SETS,
        title="Sets",
        description=f"The hyperparameter sets, {MIN_SETS} to {MAX_SETS}, each a table of the job's knobs "
        f"({', '.join(JOB_PARAMS)}) with the bounds of ec2_training's form, e.g. {EXAMPLE_SETS}; a knob a set "
        "leaves out has its configured value. Empty: use the grid.",
        section=SWEEP_SECTION,
    ),
    "grid": Param(
        None,
        type=["null", "object"],
        additionalProperties=False,
        properties={name: {"type": "array", "minItems": 1, "items": dict(BY_NAME[name].schema)} for name in JOB_PARAMS},
        title="Grid",
        description=f"Instead of sets: each knob's values, every combination trained ({MIN_SETS} to {MAX_SETS} "
        f"in all), e.g. {EXAMPLE_GRID} (6 sets). Empty: use the sets.",
        section=SWEEP_SECTION,
    ),
}

with DAG(
    dag_id="ec2_sweep",
    description="A hyperparameter sweep: one ec2_training run per set, one parent MLflow run, the best set gated",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # Its sets wait for instances under aws.max_instances anyway; this bounds how many sweeps queue sets at once.
    max_active_runs=4,
    default_args={"retries": 0},
    tags=["training", "ec2", "mlflow", "sweep"],
    # What a person sees in the UI's Docs panel (dags/docs/ec2_sweep.md), its Params listed from PARAMS.
    doc_md=dag_doc("ec2_sweep", PARAMS),
    params=PARAMS,
) as dag:

    @task(retries=2, retry_delay=timedelta(seconds=10))
    def resolve_sweep() -> dict[str, Any]:
        from orchestrator.sweeps.steps import resolve_sweep as resolve

        return resolve(get_current_context()["params"])

    ci_gate = CiGateOperator.from_run_config(
        CONFIG,
        task_id="ci_gate",
        retries=2,
        retry_delay=timedelta(seconds=30),
    )

    @task(retries=2, retry_delay=timedelta(seconds=20))
    def start_sweep(git_sha: str) -> list[dict[str, Any]]:
        from orchestrator.config.resolve import settings_of
        from orchestrator.sweeps.steps import start_sweep as start

        ctx = get_current_context()
        resolved = ctx["ti"].xcom_pull(task_ids="resolve_sweep")
        return start(settings_of(resolved["config"]), resolved["sets"], git_sha, ctx["dag"].dag_id, ctx["run_id"])

    # Both run once every set has ended, however it ended; they read upstream results themselves, since an
    # upstream that failed before the sets started left nothing to pass.
    @task(trigger_rule="all_done", **OUTAGE_RETRIES)
    def gate_best_set() -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from orchestrator.config.resolve import settings_of
        from orchestrator.sweeps.operators import child_state
        from orchestrator.sweeps.steps import gate_best

        ti = get_current_context()["ti"]
        children = ti.xcom_pull(task_ids="start_sweep")
        if not children:
            raise AirflowSkipException("the sweep started no set: nothing to gate")
        resolved = ti.xcom_pull(task_ids="resolve_sweep")
        return gate_best(settings_of(resolved["config"]), children, lambda run_id: child_state(ti, run_id))

    @task(trigger_rule="all_done", retries=2, retry_delay=timedelta(seconds=20))
    def summary() -> str:
        from orchestrator.config.resolve import settings_of
        from orchestrator.sweeps.operators import child_state
        from orchestrator.sweeps.steps import summarize

        ti = get_current_context()["ti"]
        config = (ti.xcom_pull(task_ids="resolve_sweep") or {}).get("config")
        return summarize(
            settings_of(config) if config else None,
            ti.xcom_pull(task_ids="start_sweep"),
            ti.xcom_pull(task_ids="gate_best_set"),
            lambda run_id: child_state(ti, run_id),
        )

    resolve_sweep() >> ci_gate
    children = start_sweep(ci_gate.output)
    sets = SweepSetOperator.partial(
        task_id="train_set",
        map_index_template="{{ task.note }}",
        # Each set's own bounds (CI wait, instance wait, training timeout) end its run; a retry re-attaches to it.
        poke_interval=15,
        **OUTAGE_RETRIES,
    ).expand_kwargs(children)
    sets >> gate_best_set() >> summary()
