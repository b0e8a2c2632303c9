"""Spot recovery inside the train step: EC2 took the run's spot instance back while it trained, so a new instance
is launched on the next option aws.recovery allows, made ready in this worker (running, SSH answering with its own
pinned host key, bootstrap done), and the job starts there again in the same MLflow run, resuming from its last
checkpoint. Interruptions are counted apart from failures and bounded by aws.max_preemptions."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from airflow.sdk.exceptions import AirflowFailException

from orchestrator.contracts import PREEMPTIONS_KEY, PREEMPTIONS_TAG, RECOVERED_READY_KEY
from orchestrator.contracts_steps import LaunchPlan, Preemption, ReadyInstance

if TYPE_CHECKING:
    from orchestrator.cloud.ec2_describe import InstanceInfo
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)

# EC2's StateReason codes for a spot instance it took back (terminated, or stopped for a persistent request). Any
# other end (the watchdog's power-off, a user's terminate, the reaper) is not recovered: someone meant it.
PREEMPTION_REASONS = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})


class Preempted(Exception):
    """The run's spot instance was taken back and the run may relaunch: `info` is the lost instance."""

    def __init__(self, info: InstanceInfo) -> None:
        super().__init__(f"instance {info.instance_id} taken back ({info.state_reason_code})")
        self.info = info


def preempted(info: InstanceInfo | None) -> TypeGuard[InstanceInfo]:
    """Whether EC2 took this instance back for its spot capacity (as opposed to any other end)."""
    return info is not None and info.market == "spot" and info.state_reason_code in PREEMPTION_REASONS


def raise_if_recoverable(s: Settings, ti: Any, info: InstanceInfo | None, end_run: Callable[[], object]) -> None:
    """Preempted when EC2 took the instance back for its capacity and the run may relaunch; past
    aws.max_preemptions, end the MLflow run (`end_run`) and fail saying so; nothing for any other end."""
    if info is None or not preempted(info):
        return
    earlier = len(preemptions(ti))
    if earlier < s.aws.max_preemptions:
        raise Preempted(info)
    end_run()
    check_recoverable(s, info, earlier)


def recovering(body: Callable[[], str], recover: Callable[[InstanceInfo], str]) -> str:
    """`body()`; each time the spot instance is taken back meanwhile (Preempted), `recover` from it instead."""
    try:
        return body()
    except Preempted as lost:
        info = lost.info
    while True:
        try:
            return recover(info)
        except Preempted as again:
            info = again.info


def preemption_of(info: InstanceInfo) -> Preemption:
    return Preemption(
        instance_id=info.instance_id,
        instance_type=info.instance_type,
        market=info.market,
        availability_zone=info.availability_zone or "",
        reason=info.state_reason_code or "",
        ended_at=round(time.time(), 1),
    )


def check_recoverable(s: Settings, info: InstanceInfo, earlier: int) -> None:
    """Past aws.max_preemptions, the run fails saying so (the teardown terminates every attempt's instance)."""
    if earlier >= s.aws.max_preemptions:
        raise AirflowFailException(
            f"instance {info.instance_id} ({info.instance_type}, spot) was taken back by EC2 "
            f"({info.state_reason_code}), interruption {earlier + 1} of this run, more than aws.max_preemptions = "
            f"{s.aws.max_preemptions}: trigger the run again, with spot = false for on-demand capacity, or raise "
            "aws.max_preemptions"
        )


def relaunch_ready(
    s: Settings, plan: LaunchPlan, lost: InstanceInfo, on_preempted: Callable[[InstanceInfo], None]
) -> ReadyInstance:
    """A new instance for the run, ready for the job. One taken back again before it is ready is reported to
    `on_preempted` (which counts it, and raises past the bound) and replaced in turn."""
    from orchestrator.cloud.tasks import instance_state, relaunch, wait_running
    from orchestrator.instance.ready import wait_ready_in_worker

    while True:
        launched = relaunch(s, plan, lost)
        log.info(
            "Relaunched on %s (%s, %s) after %s was taken back",
            launched.instance_id,
            launched.instance_type,
            launched.market,
            lost.instance_id,
        )
        try:
            return wait_ready_in_worker(s, launched, wait_running(s, launched))
        except Exception:
            info = instance_state(s, launched.instance_id)
            if info is None or not preempted(info):
                raise
            on_preempted(info)
            lost = info


def recover(
    s: Settings, ti: Any, lost: InstanceInfo, mlflow_run_id: str = "", end_run: Callable[[], object] = lambda: None
) -> ReadyInstance:
    """Count the interruption, then make a new instance ready for the job: wait_ready's recovery before the job
    started, or train's while it ran (its MLflow run tagged, and ended FAILED by `end_run` past the bound)."""
    count = functools.partial(record_preemption, s, ti, mlflow_run_id, end_run)
    count(lost)
    plan = LaunchPlan.from_xcom(ti.xcom_pull(task_ids=LaunchPlan.STEP))
    return relaunch_ready(s, plan, lost, count)


def preemptions(ti: Any) -> list[dict[str, Any]]:
    """The run's interruptions so far (contracts_steps.Preemption records): those wait_ready recovered from before
    the job started, then train's (during its current try: a new try starts without its XComs)."""
    return [record for step in Preemption.STEPS for record in ti.xcom_pull(task_ids=step, key=PREEMPTIONS_KEY) or []]


def current_ready(ti: Any, task_id: str, ready: Any) -> ReadyInstance:
    """The instance the job runs on: wait_ready's (`ready`), or the last one a recovery in this try made ready."""
    return ReadyInstance.from_xcom(ti.xcom_pull(task_ids=task_id, key=RECOVERED_READY_KEY) or ready)


def record_preemption(
    s: Settings, ti: Any, mlflow_run_id: str, end_run: Callable[[], object], info: InstanceInfo
) -> None:
    """Count one interruption (train's XCom, the MLflow run's tag); past aws.max_preemptions, end the MLflow run
    FAILED (`end_run`) and fail."""
    from orchestrator.tracking.runs import tag_mlflow_run

    count = len(preemptions(ti)) + 1
    try:
        check_recoverable(s, info, count - 1)
    except AirflowFailException:
        end_run()
        raise
    own = list(ti.xcom_pull(task_ids=ti.task_id, key=PREEMPTIONS_KEY) or [])
    ti.xcom_push(key=PREEMPTIONS_KEY, value=[*own, preemption_of(info).to_xcom()])
    if mlflow_run_id:
        tag_mlflow_run(s, mlflow_run_id, {PREEMPTIONS_TAG: str(count)})
    log.warning(
        "EC2 took back spot instance %s (%s in %s, %s): interruption %d of at most %d; relaunching (aws.recovery = "
        "%s), the job resumes from its last checkpoint",
        info.instance_id,
        info.instance_type,
        info.availability_zone,
        info.state_reason_code,
        count,
        s.aws.max_preemptions,
        s.aws.recovery,
    )
