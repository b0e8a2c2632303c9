"""The steps that bring up a run's instance, wired the same way in every DAG that launches one (ec2_training,
ec2_bake_image): the launch under the instance cap, then the wait until the instance is ready for SSH."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from orchestrator.cloud.operators import InstanceLaunchSensor
from orchestrator.instance.operators import InstanceReadyOperator

# One slot (config/pools.json): launches take turns, so the check against aws.max_instances and the launch that
# follows are atomic across runs and DAGs. A launch at the cap is rescheduled: it holds the slot only while it looks.
LAUNCH_POOL = "ec2_trainer_launch"


def launch_and_wait_ready(config: str, plan: Any) -> tuple[InstanceLaunchSensor, InstanceReadyOperator]:
    """The `launch` and `wait_ready` tasks, chained. wait_ready's recovery reads the plan (`plan_launch`) and the
    launch by these task ids, so a DAG names its plan step `plan_launch`."""
    launch = InstanceLaunchSensor(
        task_id="launch",
        config=config,
        plan=plan,
        pool=LAUNCH_POOL,
        retries=2,
        retry_delay=timedelta(seconds=20),
    )
    ready = InstanceReadyOperator(
        task_id="wait_ready",
        config=config,
        launched=launch.output,
        retries=2,
        retry_delay=timedelta(seconds=10),
    )
    return launch, ready
