"""Baked images: the base image with the bootstrap's installs done, which training boots from while it holds what the
current bootstrap installs (docs/decisions/0122-*.md).

ec2_bake_image launches the base image through the training's own plan and launch steps (plan_launch with
bake=True: its bootstrap in bake mode, orchestrator.cloud.user_data), waits for it, then `make_image` here stops the
builder, creates the image tagged with its source image, the bootstrap's digest and the mlflow version, waits until
it is available and records it in this deployment's SSM parameter; `prune` deregisters this deployment's baked
images older than the newest `bake.keep`, with their snapshots. The training's plan_launch asks `training_image`
which image to boot.

Every image and snapshot carries the deployment's tags from its creation (CreateImage's TagSpecifications): the IAM
policy lets a deployment launch from, deregister and delete only its own (docs/iam.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orchestrator.contracts import (
    TAG_BAKED_AT,
    TAG_BASE,
    TAG_BOOTSTRAP_DIGEST,
    TAG_MLFLOW_VERSION,
    TAG_SOURCE_IMAGE,
)
from orchestrator.errors import AWS_DENIED_CODES, OrchestratorError, aws_error_code, aws_error_message

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings
    from orchestrator.contracts_steps import LaunchPlan

log = logging.getLogger(__name__)

# This deployment's newest baked image (its id). Under /ec2-trainer/<deployment>/: the policy's ssm statements are
# scoped to that path.
BAKED_IMAGE_PARAMETER = "/ec2-trainer/{deployment}/baked-image"
# The builder's commit tag: it trains nothing, so it has none.
BUILDER_COMMIT = "none"
# How long the builder may take to stop (EC2: seconds to a couple of minutes).
STOP_TIMEOUT_S = 600


class BakeError(OrchestratorError):
    """The image could not be made (the builder did not stop, or the image never became available)."""


class BakeDeniedError(BakeError):
    """The IAM policy refused a bake call: a retry would be refused too."""

    terminal = True


@contextmanager
def denied_is_terminal(action: str) -> Iterator[None]:
    """Turn a refusal of `action` by the IAM policy into a BakeDeniedError that names what to grant."""
    try:
        yield
    except Exception as exc:
        code = aws_error_code(exc)
        if code not in AWS_DENIED_CODES:
            raise
        raise BakeDeniedError(
            f"{action} was refused ({code}: {aws_error_message(exc)}): grant the aws connection's policy the bake "
            "statements of config/iam/airflow.json (docs/iam.md), then trigger ec2_bake_image again"
        ) from exc


@dataclass(frozen=True)
class BakedImage:
    """One of this deployment's baked images, as DescribeImages shows it."""

    image_id: str
    baked_at: str
    digest: str
    snapshot_ids: tuple[str, ...]

    @classmethod
    def from_description(cls, image: dict[str, Any]) -> BakedImage:
        tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
        return cls(
            image_id=image["ImageId"],
            baked_at=tags.get(TAG_BAKED_AT) or image.get("CreationDate", ""),
            digest=tags.get(TAG_BOOTSTRAP_DIGEST, ""),
            snapshot_ids=tuple(
                m["Ebs"]["SnapshotId"]
                for m in image.get("BlockDeviceMappings", [])
                if m.get("Ebs", {}).get("SnapshotId")
            ),
        )


def bake_config() -> dict[str, Any]:
    """The bake run's configuration: the deployment's settings, on-demand (a spot instance cannot be stopped for
    its image)."""
    from orchestrator.config.resolve import resolve_config

    config = resolve_config({})
    config["aws"] = {**config["aws"], "spot": False}
    return config


def baked_image_parameter(deployment: str) -> str:
    return BAKED_IMAGE_PARAMETER.format(deployment=deployment)


def base_image(s: Settings, ssm: Any) -> tuple[str, str]:
    """(image id, the setting it came from): aws.ami_id when set, else the newest of aws.ami_ssm_parameter."""
    from orchestrator.cloud.launch_spec import resolve_ami

    if s.aws.ami_id:
        return s.aws.ami_id, "aws.ami_id"
    return resolve_ami(ssm, s.aws.ami_ssm_parameter), "aws.ami_ssm_parameter"


def configured_base(s: Settings) -> str:
    """The base image as configured: aws.ami_id, else the name of aws.ami_ssm_parameter (a new image behind it is
    the same base, so a baked image stays usable until the next bake; another parameter is another base)."""
    from orchestrator.cloud.launch_spec import tag_value

    return tag_value(s.aws.ami_id or s.aws.ami_ssm_parameter)


def training_image(s: Settings, ec2: Any, ssm: Any) -> tuple[str, str]:
    """The image a training boots and where it came from: an explicit aws.ami_id; else, with bake.use, this
    deployment's baked image when it holds what the current bootstrap installs; else the base image. Why the baked
    image is not used goes to the task log."""
    from orchestrator.cloud.user_data import settings_digest

    if not s.aws.ami_id and s.bake.use:
        parameter = baked_image_parameter(s.aws.deployment)
        image_id, why_not = usable_baked_image(
            ec2, ssm, parameter, s.aws.project_tag, s.aws.deployment, settings_digest(s), configured_base(s)
        )
        if image_id:
            log.info("Booting the baked image %s (%s): it holds what this bootstrap installs", image_id, parameter)
            return image_id, parameter
        log.info("Booting the base image, not a baked one: %s", why_not)
    return base_image(s, ssm)


def usable_baked_image(
    ec2: Any, ssm: Any, parameter: str, project_tag: str, deployment: str, digest: str, base: str
) -> tuple[str | None, str]:
    """(the baked image `parameter` names, "") when it is available, this deployment's, baked from `base` and made
    by the bootstrap whose digest is `digest`; else (None, why not)."""
    from botocore.exceptions import ClientError

    from orchestrator.cloud.launch_spec import deployment_tags

    try:
        image_id = ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
    except ClientError as exc:
        if aws_error_code(exc) != "ParameterNotFound":
            raise
        return None, f"no baked image is recorded in {parameter} (run the DAG ec2_bake_image)"
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        if not aws_error_code(exc).startswith("InvalidAMIID"):
            raise
        images = []
    if not images or images[0].get("State") != "available":
        state = images[0].get("State") if images else "gone"
        return None, f"{parameter} names {image_id}, which is {state} (bake again)"
    tags = {t["Key"]: t["Value"] for t in images[0].get("Tags", [])}
    ours = deployment_tags(project_tag, deployment)
    if any(tags.get(k) != v for k, v in ours.items()):
        return None, f"{image_id} in {parameter} is not tagged as this deployment's ({ours})"
    if tags.get(TAG_BASE) != base:
        return None, (
            f"{image_id} was baked from {tags.get(TAG_BASE) or '(unknown)'}, the base is now {base} "
            "(aws.ami_ssm_parameter or aws.ami_id changed): run ec2_bake_image again"
        )
    baked_by = tags.get(TAG_BOOTSTRAP_DIGEST, "")
    if baked_by != digest:
        return None, (
            f"{image_id} was baked by bootstrap {baked_by[:12] or '(none)'}, the current one is {digest[:12]} "
            "(userdata/bootstrap.sh or the instance settings changed since): run ec2_bake_image again"
        )
    return image_id, ""


def image_tags(s: Settings, plan: LaunchPlan, digest: str, mlflow_version: str, baked_at: float) -> dict[str, str]:
    """A baked image's tags (its snapshots carry them too): the deployment's, the bake run's, what it was made of."""
    from orchestrator.cloud.launch_spec import run_scope_tags, tag_value

    return {
        **run_scope_tags(s.aws.project_tag, s.aws.deployment, plan.dag_id, plan.run_id),
        TAG_SOURCE_IMAGE: plan.ami_id,
        TAG_BASE: configured_base(s),
        TAG_BOOTSTRAP_DIGEST: digest,
        TAG_MLFLOW_VERSION: tag_value(mlflow_version),
        TAG_BAKED_AT: datetime.fromtimestamp(baked_at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def create_image_request(
    s: Settings, plan: LaunchPlan, instance_id: str, digest: str, mlflow_version: str, now: float
) -> dict[str, Any]:
    """CreateImage's parameters: the image and its snapshots tagged alike at creation (image_tags)."""
    from orchestrator.cloud.launch_spec import tag_value

    tags = [{"Key": k, "Value": v} for k, v in image_tags(s, plan, digest, mlflow_version, now).items()]
    return {
        "InstanceId": instance_id,
        "Name": tag_value(f"{s.aws.project_tag}-{s.aws.deployment}-baked-{int(now)}"),
        "Description": f"{plan.ami_id} with the bootstrap {digest[:12]} baked in",
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("image", "snapshot")],
    }


def make_image(s: Settings, plan: LaunchPlan, instance_id: str) -> BakedImage:
    """Stop the builder, create its image (or find the one an earlier try of this run created), wait until it is
    available (bounded by bake.image_wait_minutes) and record it in this deployment's SSM parameter."""
    from orchestrator.cloud.user_data import bootstrap_digest, bootstrap_spec, mlflow_version
    from orchestrator.config.connections import AwsClients

    aws = AwsClients(s.aws.conn_id, s.aws.region)
    ec2, poll_s = aws.client("ec2"), max(s.instance.poll_seconds, 1.0)
    spec = bootstrap_spec(s)
    digest = bootstrap_digest(spec)
    found = _run_image(ec2, s, plan)
    if found is None:
        with denied_is_terminal("ec2:StopInstances"):
            stop_builder(ec2, instance_id, poll_s)
        request = create_image_request(s, plan, instance_id, digest, mlflow_version(spec), time.time())
        with denied_is_terminal("ec2:CreateImage"):
            image_id = ec2.create_image(**request)["ImageId"]
        log.info("Creating %s (%s) from %s (base image %s)", image_id, request["Name"], instance_id, plan.ami_id)
    else:
        image_id = found
        log.info("Found %s, created by an earlier try of this run", image_id)
    wait_image_available(ec2, image_id, s.bake.image_wait_minutes * 60, poll_s)
    parameter = baked_image_parameter(s.aws.deployment)
    with denied_is_terminal("ssm:PutParameter"):
        aws.client("ssm").put_parameter(Name=parameter, Value=image_id, Type="String", Overwrite=True)
    log.info("Recorded %s in %s: trainings whose bootstrap digest is %s boot it", image_id, parameter, digest)
    (image,) = ec2.describe_images(ImageIds=[image_id])["Images"]
    return BakedImage.from_description(image)


def stop_builder(ec2: Any, instance_id: str, poll_s: float) -> None:
    """Stop the builder and wait until it is stopped: an image of a stopped instance is consistent."""
    from botocore.exceptions import WaiterError

    from orchestrator.cloud.ec2 import waiter_config

    ec2.stop_instances(InstanceIds=[instance_id])
    try:
        ec2.get_waiter("instance_stopped").wait(
            InstanceIds=[instance_id], WaiterConfig=waiter_config(STOP_TIMEOUT_S, poll_s)
        )
    except WaiterError as exc:
        raise BakeError(f"builder {instance_id} did not stop within {STOP_TIMEOUT_S} s: {exc}") from exc


def wait_image_available(ec2: Any, image_id: str, timeout_s: float, poll_s: float) -> None:
    """botocore's image_available waiter, bounded; an image that fails or takes too long fails the bake."""
    from botocore.exceptions import WaiterError

    from orchestrator.cloud.ec2 import waiter_config

    try:
        ec2.get_waiter("image_available").wait(ImageIds=[image_id], WaiterConfig=waiter_config(timeout_s, poll_s))
    except WaiterError as exc:
        raise BakeError(
            f"image {image_id} is not available after {timeout_s:.0f} s (bake.image_wait_minutes): {exc}; "
            "prune deregisters it later if it ever becomes available"
        ) from exc


def _run_image(ec2: Any, s: Settings, plan: LaunchPlan) -> str | None:
    from orchestrator.cloud.launch_spec import run_scope_tags

    tags = run_scope_tags(s.aws.project_tag, s.aws.deployment, plan.dag_id, plan.run_id)
    images = ec2.describe_images(Owners=["self"], Filters=_tag_filters(tags))["Images"]
    return str(images[0]["ImageId"]) if images else None


def _tag_filters(tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]


def baked_images(ec2: Any, project_tag: str, deployment: str) -> list[BakedImage]:
    """This deployment's baked images (owned by this account, its tags, a bootstrap digest), newest first."""
    from orchestrator.cloud.launch_spec import deployment_tags

    filters = [
        *_tag_filters(deployment_tags(project_tag, deployment)),
        {"Name": "tag-key", "Values": [TAG_BOOTSTRAP_DIGEST]},
    ]
    images = ec2.describe_images(Owners=["self"], Filters=filters)["Images"]
    return sorted((BakedImage.from_description(i) for i in images), key=lambda i: i.baked_at, reverse=True)


def prune(s: Settings) -> list[str]:
    """Deregister this deployment's baked images older than the newest bake.keep, and delete their snapshots; the
    image the SSM parameter names is kept whatever its age. Returns the deregistered ids."""
    from botocore.exceptions import ClientError

    from orchestrator.config.connections import AwsClients

    aws = AwsClients(s.aws.conn_id, s.aws.region)
    ec2 = aws.client("ec2")
    try:
        recorded = aws.client("ssm").get_parameter(Name=baked_image_parameter(s.aws.deployment))["Parameter"]["Value"]
    except ClientError as exc:
        if aws_error_code(exc) != "ParameterNotFound":
            raise
        recorded = ""
    return prune_images(ec2, baked_images(ec2, s.aws.project_tag, s.aws.deployment), s.bake.keep, recorded)


def prune_images(ec2: Any, images: list[BakedImage], keep: int, recorded: str) -> list[str]:
    """Deregister `images` (newest first) past the first `keep`, never `recorded`, each with its snapshots."""
    pruned = []
    for image in images[keep:]:
        if image.image_id == recorded:
            continue
        ec2.deregister_image(ImageId=image.image_id)
        for snapshot_id in image.snapshot_ids:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        log.info(
            "Deregistered %s (baked %s) and deleted its snapshots %s",
            image.image_id,
            image.baked_at,
            image.snapshot_ids,
        )
        pruned.append(image.image_id)
    if not pruned:
        log.info("Nothing to prune: %s baked images, %s kept", len(images), keep)
    return pruned
