"""Train the hurricane-damage CNN on an ephemeral EC2 GPU instance, gated by GitHub Actions CI on the exact commit.

This file only wires tasks; each step's logic lives in the `orchestrator` package (imported lazily inside tasks, so
parsing this file stays cheap).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, setup, task, teardown

from orchestrator.ci_gate import CiGateOperator
from orchestrator.operators import RemoteTrainingOperator
from orchestrator.run_params import RUN_PARAMS

# Only the CI gate reads the configuration through templates, rendered as text: native rendering would turn a ref
# such as `1.0`, `2024` or `1234567` into a number. Every other task receives XComArgs (values, never re-parsed).
CONFIG = "ti.xcom_pull(task_ids='resolve_config')"
# One slot (config/pools.json): launches take turns, so the check against aws.max_instances and the launch that
# follows are atomic across runs. Runs waiting for an instance queue here, visible on the Pools page.
LAUNCH_POOL = "ec2_trainer_launch"

with DAG(
    dag_id="ec2_training",
    description="CI-gated training on an ephemeral EC2 GPU instance, tracked in MLflow, always terminated",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # Runs beyond aws.max_instances wait cheaply in the launch pool; this only bounds the scheduler's work.
    max_active_runs=32,
    default_args={"retries": 0},
    tags=["training", "ec2", "mlflow"],
    doc_md=__doc__,
    # One Param per knob of orchestrator/run_params.py, all empty by default: empty means the configured value.
    params={param.name: Param(None, **param.form_kwargs()) for param in RUN_PARAMS},
) as dag:

    @task(retries=0)
    def resolve_config() -> dict[str, Any]:
        from orchestrator.pipeline import resolve_config as resolve

        return resolve(get_current_context()["params"])

    ci_gate = CiGateOperator(
        task_id="ci_gate",
        git_ref="{{ " + CONFIG + "['git_ref'] }}",
        repo="{{ " + CONFIG + "['github']['repo'] }}",
        api_url="{{ " + CONFIG + "['github']['api_url'] }}",
        github_conn_id="{{ " + CONFIG + "['github']['conn_id'] }}",
        allowed_conclusions="{{ " + CONFIG + "['github']['allowed_conclusions'] | join(',') }}",
        timeout_s="{{ " + CONFIG + "['github']['ci_timeout_minutes'] * 60 }}",
        no_runs_timeout_s="{{ " + CONFIG + "['github']['ci_no_runs_timeout_minutes'] * 60 }}",
        poll_interval_s="{{ " + CONFIG + "['github']['ci_poll_seconds'] }}",
        retries=2,
        retry_delay=timedelta(seconds=30),
    )

    @setup
    @task(retries=2, retry_delay=timedelta(seconds=20))
    def plan_launch(config: dict[str, Any], git_sha: str) -> dict[str, Any]:
        from orchestrator.pipeline import plan_launch as plan

        ctx = get_current_context()
        return plan(config, git_sha, ctx["dag"].dag_id, ctx["run_id"])

    @task(retries=2, retry_delay=timedelta(seconds=20), pool=LAUNCH_POOL)
    def launch(config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        from orchestrator.pipeline import launch as launch_instance

        return launch_instance(config, plan)

    @task(retries=0)
    def wait_ready(config: dict[str, Any], launched: dict[str, Any]) -> dict[str, Any]:
        from orchestrator.pipeline import wait_ready as wait

        return wait(config, launched)

    @task(retries=2, retry_delay=timedelta(seconds=20))
    def evaluate(config: dict[str, Any], mlflow_run_id: str) -> dict[str, Any]:
        from orchestrator.pipeline import evaluate as gate

        return gate(config, mlflow_run_id)

    @teardown
    @task(retries=5, retry_delay=timedelta(seconds=15))
    def terminate(config: dict[str, Any]) -> dict[str, str]:
        """Runs whatever happened once plan_launch succeeded; finds the run's instances by tag too."""
        from orchestrator.pipeline import terminate as terminate_run

        ctx = get_current_context()
        launched = ctx["ti"].xcom_pull(task_ids="launch")
        instance_ids = [launched["instance_id"]] if launched else []
        return terminate_run(config, ctx["dag"].dag_id, ctx["run_id"], instance_ids)

    config = resolve_config()
    config >> ci_gate
    planned = plan_launch(config, ci_gate.output)
    launched = launch(config, planned)
    ready = wait_ready(config, launched)
    train = RemoteTrainingOperator(
        task_id="train",
        config=config,
        ready=ready,
        git_sha=ci_gate.output,
        retries=1,
        retry_delay=timedelta(seconds=10),
    )
    evaluated = evaluate(config, train.output)
    evaluated >> terminate(config).as_teardown(setups=planned)
