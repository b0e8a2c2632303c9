"""Train the hurricane-damage CNN on an ephemeral EC2 GPU instance, gated by GitHub Actions CI on the exact commit.

This file only wires tasks; each step's logic lives in the `orchestrator` package (imported lazily inside tasks, so
parsing this file stays cheap).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, setup, task, teardown

from orchestrator.ci.gate import CiGateOperator
from orchestrator.config.trigger_form import form_params
from orchestrator.dag_docs import dag_doc
from orchestrator.instance.training_operator import RemoteTrainingOperator
from orchestrator.instance_steps import launch_and_wait_ready
from orchestrator.observe.early_failure import announce_early_failure
from orchestrator.observe.failures import record_failure
from orchestrator.retries import OUTAGE_RETRIES

# The tasks after resolve_config read the run's configuration through templates, not XComArgs: an XComArg draws a
# graph edge from resolve_config to each task that takes it, hiding the pipeline's order. The CI gate renders its
# fields as text (CiGateOperator.from_run_config says why); every other task gets the config as JSON text, which
# settings_of and run_config read back with its types.
CONFIG = "ti.xcom_pull(task_ids='resolve_config')"
RUN_CONFIG = "{{ " + CONFIG + " | tojson }}"
# One Param per knob of orchestrator/run_params.py, all empty by default: empty means the configured value, which
# each description shows as the settings are now.
PARAMS = {name: Param(None, **kwargs) for name, kwargs in form_params().items()}

with DAG(
    dag_id="ec2_training",
    description="CI-gated training on an ephemeral EC2 GPU instance, tracked in MLflow, always terminated",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # Runs beyond aws.max_instances wait cheaply in the launch pool; this only bounds the scheduler's work.
    max_active_runs=32,
    # Each step that fails for good records its error's first line for the run report (secrets masked); one that
    # fails before plan_launch succeeded (no report will run) sends the run's failure notice itself.
    default_args={"retries": 0, "on_failure_callback": [record_failure, announce_early_failure]},
    tags=["training", "ec2", "mlflow"],
    # What a person sees in the UI's Docs panel (dags/docs/ec2_training.md), its Params listed from PARAMS.
    doc_md=dag_doc("ec2_training", PARAMS),
    params=PARAMS,
) as dag:
    # Every step a worker's death can interrupt is safe to repeat (docs/decisions/0007-*.md).
    @task(retries=2, retry_delay=timedelta(seconds=10))
    def resolve_config() -> dict[str, Any]:
        from orchestrator.config.resolve import resolve_config as resolve

        return resolve(get_current_context()["params"])

    ci_gate = CiGateOperator.from_run_config(
        CONFIG,
        task_id="ci_gate",
        retries=2,
        retry_delay=timedelta(seconds=30),
    )

    @setup
    @task(retries=2, retry_delay=timedelta(seconds=20))
    def plan_launch(config: str, git_sha: str) -> dict[str, Any]:
        from orchestrator.cloud.tasks import plan_launch as plan
        from orchestrator.config.resolve import settings_of
        from orchestrator.errors import fail_without_retry
        from orchestrator.observe.cost_cap import preflight_cost_cap

        ctx, s = get_current_context(), settings_of(config)
        planned = plan(s, git_sha, ctx["dag"].dag_id, ctx["run_id"])
        with fail_without_retry():
            preflight_cost_cap(s, planned.root_volume_gb)
        return planned.to_xcom()

    @task(**OUTAGE_RETRIES)
    def evaluate(config: str, mlflow_run_id: str) -> dict[str, Any]:
        from orchestrator.config.resolve import run_config, settings_of
        from orchestrator.tracking.promotion import evaluate as gate

        promote = run_config(config).get("promote", True)
        return gate(settings_of(config), mlflow_run_id, promote=promote).to_xcom()

    @teardown
    @task(retries=5, retry_delay=timedelta(seconds=15))
    def terminate(config: str) -> dict[str, str]:
        """Runs whatever happened once plan_launch succeeded; finds the run's instances by tag too."""
        import time

        from orchestrator.cloud.tasks import terminate_launched
        from orchestrator.config.resolve import settings_of
        from orchestrator.observe.gather import TERMINATED_AT_KEY

        ctx = get_current_context()
        states = terminate_launched(settings_of(config), ctx)
        # The end of billing when EC2 does not say when termination was asked.
        ctx["ti"].xcom_push(key=TERMINATED_AT_KEY, value=time.time())
        return states

    @teardown
    @task(retries=1, retry_delay=timedelta(seconds=15))
    def report(config: str) -> dict[str, Any] | None:
        """After terminate and evaluate, whatever happened: the run's outcome, phases and cost, logged in MLflow and
        published (orchestrator.observe.publish); ends an MLflow run the job left running. Never fails; the verdict
        after it decides the run's state."""
        from orchestrator.config.resolve import settings_of
        from orchestrator.observe.gather import report_run

        return report_run(settings_of(config), get_current_context())

    # Last, whatever happened: Airflow decides a run from its leaves minus teardowns, so a run marked failed by hand
    # (its pending steps skipped) would end success; this teardown takes part in the decision and fails the run
    # unless every step succeeded. Retries: a control-plane blip must not flip the outcome.
    @teardown(on_failure_fail_dagrun=True)
    @task(retries=3, retry_delay=timedelta(seconds=30))
    def verdict() -> str:
        from orchestrator.observe.gather import judge_run

        return judge_run(get_current_context())

    resolve_config() >> ci_gate
    planned = plan_launch(RUN_CONFIG, ci_gate.output)
    _, ready = launch_and_wait_ready(RUN_CONFIG, planned)
    train = RemoteTrainingOperator(
        task_id="train",
        config=RUN_CONFIG,
        ready=ready.output,
        # Text as the gate returned it (a sha may be all digits); a template, so no edge skips the chain.
        git_sha="{{ ti.xcom_pull(task_ids='ci_gate') }}",
        # Each retry re-attaches to the same job, or reads its result once it finished.
        **OUTAGE_RETRIES,
    )
    # The instance goes as soon as the training's result is in MLflow: evaluate needs only MLflow, not the GPU.
    terminated = terminate(RUN_CONFIG).as_teardown(setups=planned)
    train >> terminated
    evaluated = evaluate(RUN_CONFIG, train.output)
    [terminated, evaluated] >> report(RUN_CONFIG).as_teardown(setups=planned) >> verdict()
