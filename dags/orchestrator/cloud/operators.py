"""The launch step: a sensor that looks for a slot under the instance cap, then launches.

It does not sleep in a worker: it looks once per poke and is rescheduled in between (freeing its worker and its
launch-pool slot).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from orchestrator.errors import fail_without_retry

if TYPE_CHECKING:
    from airflow.sdk import Context


# How often a launch waiting at the instance cap looks again; each look is a short task run holding the launch pool.
LAUNCH_POKE_S = 15.0
LAUNCH_POKE_MAX_S = 120.0
# The sensor's own bound, never reached: aws.instance_wait_minutes (at most 7 days) fails the launch first.
LAUNCH_SENSOR_TIMEOUT_S = (7 * 24 + 1) * 3600.0


class InstanceLaunchSensor(BaseSensorOperator):
    """Launch the run's instance (or adopt an earlier try's) once the deployment is under aws.max_instances.

    Each poke counts the live instances and, if a slot is free, launches, all while holding the one-slot launch pool
    (count and launch are atomic across runs). At the cap it is rescheduled: between looks it holds neither a worker
    nor the pool slot. The wait is bounded by aws.instance_wait_minutes from the first look of the first try.
    """

    template_fields: Sequence[str] = ("config", "plan")
    ui_color = "#e8f5e9"

    def __init__(self, *, config: Any, plan: Any, **kwargs: Any) -> None:
        kwargs.setdefault("poke_interval", LAUNCH_POKE_S)
        kwargs.setdefault("exponential_backoff", True)
        kwargs.setdefault("max_wait", LAUNCH_POKE_MAX_S)
        kwargs.setdefault("timeout", LAUNCH_SENSOR_TIMEOUT_S)
        super().__init__(mode="reschedule", **kwargs)
        self.config = config
        self.plan = plan

    @fail_without_retry()
    def poke(self, context: Context) -> PokeReturnValue:
        from orchestrator.cloud.tasks import launch
        from orchestrator.config.resolve import settings_of
        from orchestrator.contracts_steps import LaunchPlan

        first_look = context["ti"].get_first_reschedule_date(context)
        waited_s = time.time() - first_look.timestamp() if first_look is not None else 0.0
        plan = LaunchPlan.from_xcom(self.plan)
        launched = launch(settings_of(self.config), plan, waited_s=waited_s)
        return PokeReturnValue(is_done=launched is not None, xcom_value=launched.to_xcom() if launched else None)
