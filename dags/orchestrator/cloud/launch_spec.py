"""What to launch, as pure data: the launch spec, the run's tags and the RunInstances request.

Nothing here calls AWS except `resolve_ami` (one SSM read); cloud.ec2 performs the calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from orchestrator.contracts import (
    TAG_DAG_ID,
    TAG_DEPLOYMENT,
    TAG_EXPIRES_AT,
    TAG_GIT_SHA,
    TAG_HOST_KEY,
    TAG_PREFIX,
    TAG_PROJECT,
    TAG_RUN_ID,
)
from orchestrator.contracts_steps import Market
from orchestrator.errors import ConfigError

# EC2 limits: tag values up to 256 characters, ClientToken up to 64 ASCII characters.
TAG_VALUE_MAX = 256
CLIENT_TOKEN_MAX = 64

# EC2 accepts most characters in tag values; other AWS services sharing tags (cost explorer, resource groups)
# accept only these, so anything else becomes "_".
_TAG_UNSAFE_RE = re.compile(r"[^\w .:/=+\-@]")
# 64 bits: values are cut to fit, so two long run ids that share a prefix differ only in this digest.
_HASH_SUFFIX_LEN = 16


class AmiNotFoundError(ConfigError):
    """The SSM parameter naming the AMI does not exist or does not hold an AMI id."""


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """Where and what to launch; validated on construction so a bad config fails before anything is spent."""

    ami_id: str
    # Preference order; see launch_attempts for how spot and on-demand interleave.
    instance_types: tuple[str, ...]
    spot: bool
    spot_fallback_to_on_demand: bool
    # One per availability zone, in order: a zone without capacity moves the launch to the next.
    subnet_ids: tuple[str, ...]
    # Never empty: EC2 would put the instance in the VPC's default group.
    security_group_ids: tuple[str, ...]
    # Ask EC2 for a public IP whatever the subnet's default (when Airflow connects to the public address).
    public_ip: bool
    # An instance profile name or ARN; None launches without one (no AWS access from the instance).
    instance_profile: str | None
    root_volume_gb: int
    # The image's own root device (DescribeImages' RootDeviceName): a mapping under another name adds a volume.
    root_device_name: str
    kms_key_id: str | None = None
    project_tag: str
    extra_tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ami_id.startswith("ami-"):
            raise ConfigError(f"ami_id {self.ami_id!r} is not an AMI id (ami-...): resolve it with resolve_ami")
        if not self.instance_types or any(not t.strip() for t in self.instance_types):
            raise ConfigError("instance_types is empty: list at least one instance type, e.g. ('g5.xlarge',)")
        if len(set(self.instance_types)) != len(self.instance_types):
            raise ConfigError(f"instance_types {self.instance_types!r} lists a type twice: remove the duplicate")
        if not self.subnet_ids:
            raise ConfigError("subnet_ids is empty: list at least one subnet (subnet-...)")
        not_subnets = [s for s in self.subnet_ids if not s.startswith("subnet-")]
        if not_subnets:
            raise ConfigError(f"subnet_ids {not_subnets!r} are not subnet ids (subnet-...)")
        if not self.security_group_ids:
            raise ConfigError("security_group_ids is empty: EC2 would use the VPC's default group; name the groups")
        if not self.root_device_name.startswith("/dev/"):
            raise ConfigError(f"root_device_name {self.root_device_name!r} is not a device name: read the image's")
        if self.root_volume_gb < 1:
            raise ConfigError(f"root_volume_gb must be at least 1, got {self.root_volume_gb}")
        if not self.project_tag.strip():
            raise ConfigError("project_tag is empty: set it, the reaper finds instances by it")
        reserved = [k for k in self.extra_tags if k.startswith((TAG_PREFIX, "aws:")) or k == "Name"]
        if reserved:
            raise ConfigError(f"extra_tags {reserved!r} use reserved keys ({TAG_PREFIX}*, aws:*, Name): rename them")


@dataclass(frozen=True)
class RunIdentity:
    """The DAG run an instance belongs to; becomes its tags.

    A run id is unique only inside one Airflow deployment (`manual__<time>` can repeat in another), so the
    deployment is part of the identity.
    """

    dag_id: str
    run_id: str
    git_sha: str
    expires_at_epoch: int
    deployment: str


def tag_value(value: str) -> str:
    """A value EC2 and the other tagging services accept, deterministic so lookups by tag match the launch.

    Over-long values keep a hash of the full value, so two long run ids that share a prefix stay distinct.
    """
    cleaned = _TAG_UNSAFE_RE.sub("_", value)
    if len(cleaned) <= TAG_VALUE_MAX and cleaned == value:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:_HASH_SUFFIX_LEN]
    return cleaned[: TAG_VALUE_MAX - _HASH_SUFFIX_LEN - 1] + "~" + digest


def expires_at_iso(epoch: int) -> str:
    """ISO-8601 UTC with a Z, the format of the expires_at tag."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expires_at(value: str) -> int | None:
    """Epoch seconds of an expires_at tag value, or None when it is not one."""
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(parsed.timestamp())


def deployment_tags(project_tag: str, deployment: str) -> dict[str, str]:
    """The tags of every instance one deployment launches: the instance cap and the reaper count only these."""
    return {TAG_PROJECT: tag_value(project_tag), TAG_DEPLOYMENT: tag_value(deployment)}


def run_scope_tags(project_tag: str, deployment: str, dag_id: str, run_id: str) -> dict[str, str]:
    """The tags every instance of one DAG run carries, whichever try launched it: teardown terminates these."""
    return {**deployment_tags(project_tag, deployment), TAG_DAG_ID: tag_value(dag_id), TAG_RUN_ID: tag_value(run_id)}


def adoption_tags(project_tag: str, deployment: str, dag_id: str, run_id: str, git_sha: str) -> dict[str, str]:
    """Every tag of the run that each try writes alike (all but expires_at and the host key, which are per try).

    A retried launch adopts only an instance carrying them all: it trusts that instance's host key tag.
    """
    name = tag_value(f"{project_tag}/{dag_id}/{git_sha[:12]}")
    return {"Name": name, **run_scope_tags(project_tag, deployment, dag_id, run_id), TAG_GIT_SHA: tag_value(git_sha)}


def run_tags(identity: RunIdentity, project_tag: str, host_public_key: str = "") -> dict[str, str]:
    """The tags that tie an instance (and its volume) to one DAG run of one deployment."""
    tags = {
        **adoption_tags(project_tag, identity.deployment, identity.dag_id, identity.run_id, identity.git_sha),
        TAG_EXPIRES_AT: expires_at_iso(identity.expires_at_epoch),
    }
    if host_public_key:
        tags[TAG_HOST_KEY] = tag_value(host_public_key)
    return tags


def client_token(identity: RunIdentity, attempt: LaunchAttempt) -> str:
    """RunInstances idempotency token: one per (run, type, market, subnet, expiry).

    It makes botocore's own retries of one call safe. expires_at is part of it because a launch task computes
    it once per try: a later try must not be handed back an instance an earlier try left terminated.
    """
    # The deployment too: tokens are per account, and two deployments can have the same run id.
    key = "\x1f".join(
        (
            identity.deployment,
            identity.dag_id,
            identity.run_id,
            attempt.instance_type,
            attempt.market,
            attempt.subnet_id,
            str(identity.expires_at_epoch),
        )
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:CLIENT_TOKEN_MAX]


@dataclass(frozen=True)
class LaunchAttempt:
    """One RunInstances to try: a type, a market and the subnet (so the availability zone) it launches in."""

    instance_type: str
    market: Market
    subnet_id: str

    def __str__(self) -> str:
        return f"{self.instance_type} ({self.market}) in {self.subnet_id}"


def launch_markets(spot: bool, spot_fallback_to_on_demand: bool) -> list[Market]:
    """The markets a launch tries, in order (aws.spot, aws.spot_fallback_to_on_demand)."""
    if not spot:
        return ["on-demand"]
    return ["spot", "on-demand"] if spot_fallback_to_on_demand else ["spot"]


def launch_attempts(spec: LaunchSpec) -> list[LaunchAttempt]:
    """The launches to try, in order.

    Spot first for every type, then on-demand for every type when falling back is allowed: any spot capacity
    is preferred to on-demand capacity, because spot costs a fraction of on-demand for the same training run.
    Each (type, market) is tried in every zone before the next: capacity differs by zone far more than the
    price of one type does, and the first type is the one the user prefers.
    """
    return [
        LaunchAttempt(instance_type, market, subnet_id)
        for market in launch_markets(spec.spot, spec.spot_fallback_to_on_demand)
        for instance_type in spec.instance_types
        for subnet_id in spec.subnet_ids
    ]


Recovery = Literal["spot_then_on_demand", "spot_only", "on_demand"]


def recovery_attempts(spec: LaunchSpec, lost: LaunchAttempt, policy: Recovery) -> list[LaunchAttempt]:
    """The launches to try after EC2 took back the spot instance of `lost` (aws.recovery).

    Spot options begin with the one after the lost one (the same type in the next zone, then the next type) and end
    with the lost one itself, whose zone may have capacity again; on-demand options follow them with
    spot_then_on_demand, and are the only ones with on_demand.
    """
    on_demand = launch_attempts(dataclasses.replace(spec, spot=False))
    if policy == "on_demand":
        return on_demand
    spot = launch_attempts(dataclasses.replace(spec, spot=True, spot_fallback_to_on_demand=False))
    if lost in spot:
        after = spot.index(lost) + 1
        spot = spot[after:] + spot[:after]
    return spot + (on_demand if policy == "spot_then_on_demand" else [])


def build_run_instances_request(
    spec: LaunchSpec,
    identity: RunIdentity,
    user_data: str,
    attempt: LaunchAttempt,
    *,
    host_public_key: str = "",
) -> dict[str, Any]:
    """Keyword arguments for `ec2.run_instances(**request)`."""
    tags = {
        **{k: tag_value(v) for k, v in spec.extra_tags.items()},
        **run_tags(identity, spec.project_tag, host_public_key),
    }
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    ebs: dict[str, Any] = {
        "VolumeSize": spec.root_volume_gb,
        "VolumeType": "gp3",
        "Encrypted": True,
        "DeleteOnTermination": True,
    }
    if spec.kms_key_id:
        ebs["KmsKeyId"] = spec.kms_key_id
    request: dict[str, Any] = {
        "ImageId": spec.ami_id,
        "InstanceType": attempt.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        # Plain text: boto3 base64-encodes it.
        "UserData": user_data,
        # IMDSv2 only; hop limit 2 so containers on the instance still reach it.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
        "BlockDeviceMappings": [{"DeviceName": spec.root_device_name, "Ebs": ebs}],
        # The watchdog's power-off becomes a termination.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
        "ClientToken": client_token(identity, attempt),
    }
    if spec.instance_profile:
        key = "Arn" if spec.instance_profile.startswith("arn:") else "Name"
        request["IamInstanceProfile"] = {key: spec.instance_profile}
    # One interface rather than top-level SubnetId/SecurityGroupIds: only here can the request ask for a public IP
    # (or refuse one) instead of taking the subnet's default.
    request["NetworkInterfaces"] = [
        {
            "DeviceIndex": 0,
            "SubnetId": attempt.subnet_id,
            "Groups": list(spec.security_group_ids),
            "AssociatePublicIpAddress": spec.public_ip,
            "DeleteOnTermination": True,
        }
    ]
    if attempt.market == "spot":
        request["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
        }
    return request


def resolve_ami(ssm_client: Any, parameter_name: str) -> str:
    """The AMI id held by an SSM public parameter (e.g. a Deep Learning AMI's `.../latest/ami-id`)."""
    from botocore.exceptions import ClientError

    region = ssm_client.meta.region_name
    try:
        value = ssm_client.get_parameter(Name=parameter_name)["Parameter"]["Value"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("ParameterNotFound", "ValidationException"):
            raise AmiNotFoundError(
                f"SSM parameter {parameter_name} not found in region {region}: set aws.ami_ssm_parameter "
                "to an existing Deep Learning AMI parameter"
            ) from exc
        raise
    if not isinstance(value, str) or not value.startswith("ami-"):
        raise AmiNotFoundError(
            f"SSM parameter {parameter_name} in region {region} holds {value!r}, not an AMI id: set "
            "aws.ami_ssm_parameter to a parameter ending in /ami-id"
        )
    return value
