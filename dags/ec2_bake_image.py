"""Bake this deployment's training image: the base image booted with the bootstrap in bake mode, stopped, imaged,
recorded in SSM; older baked images pruned. ec2_training boots it while it holds what the current bootstrap installs.

This file only wires tasks; the steps are the training's own (plan, launch, ready wait, terminate) and
orchestrator/cloud/bake.py. Triggered by hand, or on bake.schedule (read when this file is parsed).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, get_current_context, setup, task, teardown

from orchestrator.config.settings import load_watch_settings
from orchestrator.dag_docs import dag_doc
from orchestrator.instance_steps import launch_and_wait_ready

WATCH = load_watch_settings()
CONFIG = "{{ ti.xcom_pull(task_ids='resolve_config') | tojson }}"

with DAG(
    dag_id="ec2_bake_image",
    description="Bake the training image: base image + bootstrap installs, imaged, recorded, older ones pruned",
    schedule=CronTriggerTimetable(WATCH.bake.schedule, timezone="UTC") if WATCH.bake.schedule else None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # Two bakes at once would prune each other's images.
    max_active_runs=1,
    default_args={"retries": 0},
    tags=["ec2", "image"],
    doc_md=dag_doc("ec2_bake_image"),
):

    @task(retries=2, retry_delay=timedelta(seconds=10))
    def resolve_config() -> dict[str, Any]:
        from orchestrator.cloud.bake import bake_config

        return bake_config()

    # Named as the training's steps: wait_ready's recovery reads the plan and the launch by these task ids.
    @setup
    @task(task_id="plan_launch", retries=2, retry_delay=timedelta(seconds=20))
    def plan_bake(config: str) -> dict[str, Any]:
        from orchestrator.cloud.bake import BUILDER_COMMIT
        from orchestrator.cloud.tasks import plan_launch
        from orchestrator.config.resolve import settings_of

        ctx = get_current_context()
        return plan_launch(settings_of(config), BUILDER_COMMIT, ctx["dag"].dag_id, ctx["run_id"], bake=True).to_xcom()

    # Each try stops the builder and finds the image an earlier try created before it creates one. A call the IAM
    # policy refuses fails at once: no retry changes the policy.
    @task(retries=2, retry_delay=timedelta(seconds=30))
    def make_image(config: str, plan: dict[str, Any], launched: Any) -> dict[str, Any]:
        from dataclasses import asdict

        from orchestrator.cloud.bake import make_image as make
        from orchestrator.config.resolve import settings_of
        from orchestrator.contracts_steps import LaunchedInstance, LaunchPlan
        from orchestrator.errors import fail_without_retry

        instance_id = LaunchedInstance.from_xcom(launched).instance_id
        with fail_without_retry():
            return asdict(make(settings_of(config), LaunchPlan.from_xcom(plan), instance_id))

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def prune(config: str) -> list[str]:
        from orchestrator.cloud.bake import prune as prune_images
        from orchestrator.config.resolve import settings_of

        return prune_images(settings_of(config))

    @teardown
    @task(retries=5, retry_delay=timedelta(seconds=15))
    def terminate(config: str) -> dict[str, str]:
        """Runs whatever happened once plan_launch succeeded: the builder never outlives the run."""
        from orchestrator.cloud.tasks import terminate_launched
        from orchestrator.config.resolve import settings_of

        return terminate_launched(settings_of(config), get_current_context())

    planned = plan_bake(CONFIG)
    resolve_config() >> planned
    # The training's launch and ready wait: the builder counts under aws.max_instances as any instance.
    launch, ready = launch_and_wait_ready(CONFIG, planned)
    made = make_image(CONFIG, planned, launch.output)
    ready >> made
    made >> terminate(CONFIG).as_teardown(setups=planned)
    made >> prune(CONFIG)
