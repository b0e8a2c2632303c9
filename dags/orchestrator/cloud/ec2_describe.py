"""What EC2 says about instances, read-only: their states, who they are by tag, why one is gone, what a region offers.

DescribeInstances is paginated and filtered by the run's tags (identity is tags, never saved state); cloud.ec2's launch,
wait and terminate read instances through these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.cloud.launch_spec import deployment_tags
from orchestrator.contracts_steps import Market
from orchestrator.errors import aws_error_code

LIVE_STATES = ("pending", "running", "stopping", "stopped")
GONE_STATES = ("shutting-down", "terminated")

NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    state: str
    instance_type: str
    public_ip: str | None
    private_ip: str | None
    launch_time: datetime | None
    state_reason: str | None = None
    state_reason_code: str | None = None
    # EC2's "User initiated (2026-01-01 12:00:00 GMT)": when a stop or termination was asked (billing ends there).
    state_transition_reason: str | None = None
    availability_zone: str | None = None
    market: Market = "on-demand"
    subnet_id: str | None = None


def instance_tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def describe_matching(ec2: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [instance for page in pages for r in page.get("Reservations", []) for instance in r.get("Instances", [])]


def tag_filters(tags: Mapping[str, str], states: Iterable[str] = LIVE_STATES) -> list[dict[str, Any]]:
    """DescribeInstances filters matching instances that carry every one of these tags, in one of these states."""
    return [
        *({"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()),
        {"Name": "instance-state-name", "Values": list(states)},
    ]


def live_in_project(project_tag: str, deployment: str) -> list[dict[str, Any]]:
    return tag_filters(deployment_tags(project_tag, deployment))


def find_run_instances(
    ec2: Any,
    tags: Mapping[str, str],
    states: Iterable[str] = LIVE_STATES,
) -> list[dict[str, Any]]:
    """The instances carrying every one of the run's tags (launch.run_scope_tags or adoption_tags), oldest first."""
    found = describe_matching(ec2, tag_filters(tags, states))
    return sorted(found, key=lambda i: (str(i.get("LaunchTime", "")), i["InstanceId"]))


def market_of(instance: dict[str, Any]) -> Market:
    return "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"


def _info(instance: dict[str, Any]) -> InstanceInfo:
    reason = instance.get("StateReason") or {}
    return InstanceInfo(
        instance_id=instance["InstanceId"],
        state=instance["State"]["Name"],
        instance_type=instance.get("InstanceType", ""),
        public_ip=instance.get("PublicIpAddress"),
        private_ip=instance.get("PrivateIpAddress"),
        launch_time=instance.get("LaunchTime"),
        state_reason=reason.get("Message") or reason.get("Code"),
        state_reason_code=reason.get("Code"),
        state_transition_reason=instance.get("StateTransitionReason") or None,
        availability_zone=(instance.get("Placement") or {}).get("AvailabilityZone"),
        market=market_of(instance),
        subnet_id=instance.get("SubnetId"),
    )


# Why EC2 stopped or terminated an instance (its StateReason code), in the words a user acts on.
GONE_REASONS: Mapping[str, str] = {
    "Client.InstanceInitiatedShutdown": "it powered itself off: its max-lifetime watchdog (aws.max_lifetime_minutes) "
    "ran out, its guard stopped a stalled, GPU-idle or over-budget job (training.stall_minutes, gpu_idle_minutes, "
    "max_cost_usd), or something on the instance ran shutdown",
    "Server.SpotInstanceTermination": "EC2 interrupted the spot instance to take its capacity back",
    "Server.SpotInstanceShutdown": "EC2 interrupted the spot instance to take its capacity back",
    "Client.UserInitiatedShutdown": "a StopInstances or TerminateInstances call ended it: the EC2 console, a "
    "script, or the reaper of expired instances",
    "Server.ScheduledStop": "EC2 stopped it for a scheduled retirement of its host",
    "Server.InternalError": "an internal error of EC2",
    "Server.InsufficientInstanceCapacity": "EC2 had no capacity left for it",
}


def instance_gone_message(instance_id: str, info: InstanceInfo | None) -> str | None:
    """Why the instance can no longer answer (its state and EC2's reason, explained); None while pending or running.

    Asked when SSH fails, so that an instance ended while nobody watched is reported as ended, not as an SSH error."""
    if info is not None and info.state in ("pending", "running"):
        return None
    if info is None:
        return f"instance {instance_id} is gone: EC2 no longer knows it (it forgets terminated instances within hours)"
    explained = GONE_REASONS.get(info.state_reason_code or "")
    return f"instance {instance_id} is {info.state} ({info.state_reason or 'EC2 gave no reason'})" + (
        f": {explained}" if explained else ""
    )


def live_project_instances(ec2: Any, project_tag: str, deployment: str) -> list[str]:
    """Ids of this deployment's instances that are not shutting down or gone, whichever of its runs launched them."""
    return sorted(i["InstanceId"] for i in describe_matching(ec2, live_in_project(project_tag, deployment)))


def describe_instance(ec2: Any, instance_id: str) -> InstanceInfo | None:
    """The instance's current state, or None when EC2 does not know the id (yet, or any more)."""
    from botocore.exceptions import ClientError

    try:
        response = ec2.describe_instances(InstanceIds=[instance_id])
    except ClientError as exc:
        if aws_error_code(exc) in NOT_FOUND_CODES:
            return None
        raise
    return first_info(response)


def first_info(response: dict[str, Any]) -> InstanceInfo | None:
    for reservation in response.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            return _info(instance)
    return None


def unoffered_instance_types(ec2: Any, instance_types: Iterable[str]) -> list[str]:
    """The requested types that this region does not offer (misspelt or unknown names included), in request order."""
    wanted = list(instance_types)
    pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="region", Filters=[{"Name": "instance-type", "Values": wanted}]
    )
    offered = {o["InstanceType"] for page in pages for o in page.get("InstanceTypeOfferings", [])}
    return [t for t in wanted if t not in offered]
