"""An in-process AWS (moto's mock_aws) as strict as the embedded cloud: its images, its network, an instance profile
and EC2's root-volume rules; plus EC2 taking a pending instance back, as it does when capacity runs out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from embedded.cloud.seed import StandInNetwork, create_network, register_images
from embedded.cloud.strict_moto import install_strict_ec2

REGION = "us-east-1"
PROFILE = "trainer"
SSH_PORT = 22


@dataclass(frozen=True)
class StrictAws:
    ec2: Any
    ssm: Any
    iam: Any
    images: dict[str, str]  # SSM parameter -> image id
    network: StandInNetwork


@contextmanager
def in_process_aws() -> Iterator[None]:
    """moto's `mock_aws`, which wipes this process's moto state on entering and on leaving: the session's embedded
    stack, if this test process runs one, gets its standing resources (images, network, profile) back afterwards,
    whichever tests xdist puts after this one."""
    from moto import mock_aws

    from embedded.cloud import running_cloud

    try:
        with mock_aws():
            yield
    finally:
        if (cloud := running_cloud()) is not None:
            cloud.seed()


@contextmanager
def strict_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[StrictAws]:
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    uninstall = install_strict_ec2()
    try:
        with in_process_aws():
            ec2, ssm, iam = (boto3.client(s, region_name=REGION) for s in ("ec2", "ssm", "iam"))
            trust = {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
                ],
            }
            iam.create_role(RoleName=PROFILE, AssumeRolePolicyDocument=json.dumps(trust))
            iam.create_instance_profile(InstanceProfileName=PROFILE)
            iam.add_role_to_instance_profile(InstanceProfileName=PROFILE, RoleName=PROFILE)
            yield StrictAws(ec2, ssm, iam, register_images(REGION), create_network(ec2, REGION, SSH_PORT))
    finally:
        uninstall()


def take_back_while_pending(instance: Any, code: str = "Server.InsufficientInstanceCapacity") -> None:
    """What EC2 does to a pending instance when the capacity it was placed on is gone: pending -> terminated."""
    from moto.ec2.models.instances import StateReason

    instance.terminate()
    instance.state_reason = StateReason(f"{code}: taken back while pending", code)


def take_back_the_first(
    instance_type: str, monkeypatch: pytest.MonkeyPatch, code: str = "Server.InsufficientInstanceCapacity"
) -> list[str]:
    """EC2 takes back the first instance of `instance_type` before it runs, giving `code` as its state reason;
    returns the types of every launch."""
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances
    launched: list[str] = []

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original(self, *args, **kwargs)
        launched.append(kwargs["instance_type"])
        if launched.count(instance_type) == 1 and kwargs["instance_type"] == instance_type:
            for instance in reservation.instances:
                take_back_while_pending(instance, code)
        return reservation

    monkeypatch.setattr(EC2Backend, "run_instances", run_instances)
    return launched


def http_errors(
    monkeypatch: pytest.MonkeyPatch, action: str, code: str, status: int, failures: int | None = None
) -> list[int]:
    """The first `failures` requests of an EC2 action (every one when None) are answered with EC2's error `code` and
    HTTP `status`, as the EC2 endpoint answers them: botocore's retry handler sees each one. Returns one entry (the
    status sent) per HTTP request, in-process (mock_aws) or through the moto server alike."""
    from moto.ec2.responses import EC2Response

    method = "".join("_" + c.lower() if c.isupper() else c for c in action).lstrip("_")
    original = getattr(EC2Response, method)
    requests: list[int] = []
    body = (
        f"<Response><Errors><Error><Code>{code}</Code><Message>injected {code}</Message></Error></Errors>"
        "<RequestID>fault</RequestID></Response>"
    )

    def answer(self: Any) -> Any:
        if failures is None or len(requests) < failures:
            requests.append(status)
            return body, {"status": status}
        requests.append(200)
        return original(self)

    monkeypatch.setattr(EC2Response, method, answer)
    return requests
