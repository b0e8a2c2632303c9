"""EC2 instance lifecycle over a boto3 EC2 client: launch (idempotent, with fallbacks), wait, adopt, terminate, reap.
Reading what exists (describe, tag filters, why an instance is gone) is cloud.ec2_describe.

Identity is the run's tags, never saved state: a retried launch finds the instance an earlier try made, and
teardown and the reaper re-find what exists. Every call that loops is bounded.

Throttling and server errors are retried by botocore itself, in the client (connections.aws_client: standard mode,
jittered backoff, a bounded number of attempts): nothing here retries a call around it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from orchestrator.cloud.ec2_describe import (
    GONE_STATES,
    NOT_FOUND_CODES,
    InstanceInfo,
    describe_instance,
    describe_matching,
    find_run_instances,
    first_info,
    instance_tags,
    live_in_project,
    live_project_instances,
    market_of,
)
from orchestrator.cloud.launch_spec import (
    LaunchAttempt,
    LaunchSpec,
    RunIdentity,
    adoption_tags,
    build_run_instances_request,
    launch_attempts,
    parse_expires_at,
    run_scope_tags,
)
from orchestrator.contracts import TAG_EXPIRES_AT, TAG_HOST_KEY, TAG_RUN_ID
from orchestrator.contracts_steps import LaunchedInstance
from orchestrator.errors import OrchestratorError, aws_error_code, aws_error_message

log = logging.getLogger(__name__)


# Errors where another instance type or market may succeed: no capacity, or a quota or price for this one.
CAPACITY_ERROR_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "Unsupported",
        "UnfulfillableCapacity",
    }
)
# State reasons of an instance EC2 took back before it ran (capacity, spot): another (type, market) may still have
# room. Client.* reasons (a person terminated it, a KMS key it may not use) fail instead.
CAPACITY_LOST_REASONS = frozenset(
    {
        "Server.InsufficientInstanceCapacity",
        "Server.SpotInstanceTermination",
        "Server.SpotInstanceShutdown",
        "Server.InternalError",
    }
)

# Instances without a readable expires_at tag are reaped only once older than this: longer than any sensible
# training run, so a hand-launched instance still being tagged is not killed by a race.
UNTAGGED_GRACE_S = 24 * 3600


class LaunchError(OrchestratorError):
    """RunInstances failed for a reason other than capacity."""


class CapacityError(LaunchError):
    """Every launch attempt (type, market, zone) failed for lack of capacity or quota."""

    def __init__(self, message: str, tried: tuple[tuple[LaunchAttempt, str], ...]) -> None:
        super().__init__(message)
        self.tried = tried


class InstanceNotReadyError(OrchestratorError):
    """The instance did not reach running (lost, terminated, or too slow)."""


class InstanceLostError(InstanceNotReadyError):
    """The instance stopped or terminated before it ran; reason_code is EC2's StateReason code."""

    def __init__(self, message: str, reason_code: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class InstanceCapError(OrchestratorError):
    """The project's instance cap stayed reached for longer than the launch may wait."""

    # A retry would wait the whole aws.instance_wait_minutes again.
    terminal = True


def adopt_run_instance(
    ec2: Any,
    project_tag: str,
    deployment: str,
    dag_id: str,
    run_id: str,
    git_sha: str,
) -> LaunchedInstance | None:
    """The live instance an earlier try of this run launched (the oldest, if several), or None.

    Only an instance with all of the run's tags (deployment, DAG, run, commit: launch.adoption_tags) qualifies:
    its host key tag is trusted for SSH, so another deployment's instance with the same run id must never match.
    """
    existing = find_run_instances(ec2, adoption_tags(project_tag, deployment, dag_id, run_id, git_sha))
    if not existing:
        return None
    chosen = existing[0]
    if len(existing) > 1:
        log.warning(
            "run %s has %s live instances (%s); reusing the oldest, teardown terminates all of them",
            run_id,
            len(existing),
            ", ".join(i["InstanceId"] for i in existing),
        )
    log.info("reusing instance %s of run %s (state %s)", chosen["InstanceId"], run_id, chosen["State"]["Name"])
    return LaunchedInstance(
        chosen["InstanceId"],
        chosen.get("InstanceType", ""),
        market_of(chosen),
        reused=True,
        host_public_key=instance_tags(chosen).get(TAG_HOST_KEY, ""),
    )


def instance_slot_free(
    ec2: Any,
    project_tag: str,
    deployment: str,
    max_instances: int,
    waited_s: float,
    timeout_s: float,
) -> bool:
    """One look: are fewer than max_instances of the deployment's instances live? At the cap after `timeout_s` of
    waiting, raises InstanceCapError; before that, False (the caller looks again later, holding nothing meanwhile).

    Counting in EC2, not in Airflow, caps what is billed: instances left by a crashed run count until they are gone.
    Callers serialise this check and the launch that follows (the DAG's one-slot launch pool), or two launches
    could both see the last free slot.
    """
    live = live_project_instances(ec2, project_tag, deployment)
    if len(live) < max_instances:
        if waited_s > 0.5:
            log.info("an instance slot is free (%d of %d live) after %.0f s", len(live), max_instances, waited_s)
        return True
    if waited_s >= timeout_s:
        raise InstanceCapError(
            f"{len(live)} instances of deployment {deployment} are live ({', '.join(live)}), at the cap "
            f"aws.max_instances = {max_instances}, for {waited_s:.0f} s. Trigger the run again later, raise "
            "aws.max_instances or aws.instance_wait_minutes, or check these instances in the EC2 console"
        )
    log.info(
        "%d of at most %d instances of deployment %s are live (%s); waited %.0f s of up to %.0f s for one to end",
        len(live),
        max_instances,
        deployment,
        ", ".join(live),
        waited_s,
        timeout_s,
    )
    return False


def launch_instance(
    ec2: Any,
    spec: LaunchSpec,
    identity: RunIdentity,
    user_data: str,
    *,
    host_public_key: str = "",
    running_timeout_s: float,
    poll_s: float,
    attempts: Sequence[LaunchAttempt] | None = None,
) -> LaunchedInstance:
    """A running instance for the run, from the first attempt (type, market, zone) with capacity.

    Moves to the next attempt on CAPACITY_ERROR_CODES, and when EC2 takes a pending instance back before it
    runs (CAPACITY_LOST_REASONS); any other error raises at once, terminating what was launched. Every attempt
    together gets running_timeout_s. `attempts` replaces the spec's own order (a relaunch after a spot
    interruption: launch_spec.recovery_attempts). Callers adopt an earlier try's instance first
    (adopt_run_instance): the run's tags, not the ClientToken, make a retry idempotent.
    """
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + running_timeout_s
    tried: list[tuple[LaunchAttempt, str]] = []
    for attempt in launch_attempts(spec) if attempts is None else attempts:
        if time.monotonic() >= deadline:
            tried.append((attempt, f"not tried: {running_timeout_s:.0f} s spent"))
            continue
        request = build_run_instances_request(spec, identity, user_data, attempt, host_public_key=host_public_key)
        log.info("launching %s for run %s of %s", attempt, identity.run_id, identity.dag_id)
        try:
            response = ec2.run_instances(**request)
        except ClientError as exc:
            code, message = aws_error_code(exc), aws_error_message(exc)
            if code in CAPACITY_ERROR_CODES:
                log.warning("no capacity for %s: %s: %s; trying the next option", attempt, code, message)
                tried.append((attempt, code))
                continue
            raise LaunchError(
                f"RunInstances for {attempt} failed: {code}: {message}. "
                "Check the AMI, subnet, security groups, instance profile and the IAM permissions in docs/iam.md"
            ) from exc
        instance_id = response["Instances"][0]["InstanceId"]
        try:
            state = response["Instances"][0]["State"]["Name"]
            if state in GONE_STATES:
                # An idempotent replay of an earlier try's request: that instance is already gone.
                raise LaunchError(
                    f"RunInstances returned instance {instance_id} already {state} (same ClientToken as an earlier "
                    "try): compute a new expires_at for this try so the launch gets a fresh token"
                )
            log.info("launched instance %s, %s, for run %s", instance_id, attempt, identity.run_id)
            try:
                wait_until_running(ec2, instance_id, max(0.0, deadline - time.monotonic()), poll_s)
            except InstanceLostError as lost:
                if lost.reason_code not in CAPACITY_LOST_REASONS:
                    raise
                log.warning("%s; trying the next option", lost)
                terminate_instances(ec2, [instance_id])  # gone already; asking again is harmless
                tried.append((attempt, lost.reason_code))
                continue
        except BaseException:
            terminate_instances(ec2, [instance_id])
            raise
        return LaunchedInstance(
            instance_id, attempt.instance_type, attempt.market, reused=False, host_public_key=host_public_key
        )

    summary = "; ".join(f"{attempt}: {code}" for attempt, code in tried)
    hint = (
        "add other instance types to aws.instance_types, subnets in other availability zones to aws.subnet_ids, "
        "or use another region"
    )
    if spec.spot and not spec.spot_fallback_to_on_demand:
        hint += ", allow the on-demand fallback"
    raise CapacityError(
        f"no capacity for any launch option: {summary}. To fix: {hint}, or request a quota increase "
        "(Service Quotas: EC2 running on-demand/spot G and VT instances)",
        tuple(tried),
    )


def waiter_config(timeout_s: float, poll_s: float) -> dict[str, Any]:
    """A boto waiter's bounds: one look every poll_s, for at most timeout_s (one look at least)."""
    return {"Delay": poll_s, "MaxAttempts": max(1, math.ceil(timeout_s / poll_s))}


def wait_until_running(ec2: Any, instance_id: str, timeout_s: float, poll_s: float) -> InstanceInfo:
    """The instance once it runs (boto's bounded `instance_running` waiter); fails fast when it stops or terminates
    first (InstanceLostError, with EC2's StateReason), and after timeout_s."""
    from botocore.exceptions import WaiterError

    try:
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id], WaiterConfig=waiter_config(timeout_s, poll_s)
        )
    except WaiterError as exc:
        last = exc.last_response or {}
        info = first_info(last)
        if info is not None and info.state not in ("pending", "running"):
            raise InstanceLostError(
                f"instance {instance_id} went {info.state} before running: {info.state_reason or 'no reason given'}. "
                "For capacity or spot interruptions, retry with other instance types or on-demand",
                info.state_reason_code or "",
            ) from exc
        error = last.get("Error") or {}
        seen = info.state if info is not None else "not visible yet"
        if error:
            seen += f"; EC2 answered {error.get('Code')}: {error.get('Message')}"
        raise InstanceNotReadyError(
            f"instance {instance_id} not running after {timeout_s:.0f}s (last state: {seen}): "
            "check the EC2 console for it; raise aws.launch_timeout_minutes if the region is slow"
        ) from exc
    info = describe_instance(ec2, instance_id)
    if info is None:  # the waiter just saw it running
        raise InstanceNotReadyError(f"instance {instance_id} ran, then EC2 no longer knew it: check the EC2 console")
    log.info("instance %s is %s", instance_id, info.state)
    return info


def terminate_instances(ec2: Any, instance_ids: Iterable[str]) -> list[str]:
    """Terminates the ids EC2 knows; unknown or malformed ids are skipped. Returns the ids EC2 accepted."""
    from botocore.exceptions import ClientError

    ids = sorted(set(instance_ids))
    if not ids:
        return []
    try:
        ec2.terminate_instances(InstanceIds=ids)
    except ClientError as exc:
        if aws_error_code(exc) not in NOT_FOUND_CODES:
            raise
        # One bad id fails the whole batch: go one by one to terminate the others.
        accepted: list[str] = []
        for instance_id in ids:
            try:
                ec2.terminate_instances(InstanceIds=[instance_id])
            except ClientError as single:
                if aws_error_code(single) not in NOT_FOUND_CODES:
                    raise
                log.warning(
                    "instance %s unknown to EC2 (%s); nothing to terminate", instance_id, aws_error_code(single)
                )
                continue
            accepted.append(instance_id)
        ids = accepted
    if ids:
        log.info("terminate requested for %s", ", ".join(ids))
    return ids


def terminate_run(
    ec2: Any,
    project_tag: str,
    deployment: str,
    dag_id: str,
    run_id: str,
    instance_ids: Iterable[str] = (),
) -> list[str]:
    """Terminates the given ids and every live instance tagged with the run in this deployment; harmless to repeat."""
    tags = run_scope_tags(project_tag, deployment, dag_id, run_id)
    tagged = [i["InstanceId"] for i in find_run_instances(ec2, tags)]
    return terminate_instances(ec2, [*instance_ids, *tagged])


def terminate_expired(
    ec2: Any,
    project_tag: str,
    deployment: str,
    now_epoch: float,
    *,
    untagged_grace_s: float = UNTAGGED_GRACE_S,
) -> list[str]:
    """Terminates this deployment's live instances past their expires_at; returns their ids.

    An instance with a missing or unreadable expires_at is reaped once it has run longer than untagged_grace_s.
    """
    expired: list[str] = []
    for instance in describe_matching(ec2, live_in_project(project_tag, deployment)):
        instance_id = instance["InstanceId"]
        tags = instance_tags(instance)
        expires_at = parse_expires_at(tags.get(TAG_EXPIRES_AT, ""))
        if expires_at is not None:
            if expires_at <= now_epoch:
                log.warning(
                    "instance %s of run %s expired at %s", instance_id, tags.get(TAG_RUN_ID), tags[TAG_EXPIRES_AT]
                )
                expired.append(instance_id)
            continue
        launched = instance.get("LaunchTime")
        if isinstance(launched, datetime) and now_epoch - launched.timestamp() > untagged_grace_s:
            log.warning("instance %s has no readable %s and launched at %s", instance_id, TAG_EXPIRES_AT, launched)
            expired.append(instance_id)
    return terminate_instances(ec2, expired)
