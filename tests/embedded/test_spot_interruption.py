"""A spot interruption on an emulated instance, as FIS sends one: the instance's own metadata service shows the notice,
its spot watcher passes it on to the job and the orchestrator, and EC2 then terminates it for the spot market."""

from __future__ import annotations

import json

import pytest

from embedded.cloud import LocalCloud, send_spot_interruption
from orchestrator.cloud.hostkeys import generate_host_key
from orchestrator.instance.ssh import connect, wait_for_bootstrap
from tests.embedded.test_cloud import WAIT_S, client_key, cloud, describe, launch, ssh_port, target_of, wait_until
from tests.support.sshd import SshKeyPair

__all__ = ["client_key", "cloud", "ssh_port"]  # the fixtures, shared with test_cloud

# What the job and the orchestrator run over SSH: the job finds the request through env.sh, reads and removes it.
READ_AS_THE_JOB = (
    'set -e; . "{state}/env.sh"; cat "$EC2_TRAINER_CHECKPOINT_REQUEST"; rm "$EC2_TRAINER_CHECKPOINT_REQUEST"; '
    'echo; cat "{state}/spot-notice"'
)
# From an SSH session: a token, then the instance's id, at the address AWS's own variable gives.
ASK_IMDS = (
    'base="$AWS_EC2_METADATA_SERVICE_ENDPOINT"; '
    't=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "${base}latest/api/token"); '
    'curl -s -o /dev/null -w "%{http_code} " "${base}latest/meta-data/instance-id"; '
    'curl -sf -H "X-aws-ec2-metadata-token: $t" "${base}latest/meta-data/instance-id"'
)


def test_the_watcher_passes_the_notice_on_and_ec2_terminates_for_the_spot_market(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int
) -> None:
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key, ssh_port, spot=True)
    try:
        target = target_of(cloud, instance_id, host_key.public_line, client_key, ssh_port)
        state = str(cloud.disk_root / "state")
        assert wait_for_bootstrap(target, state, timeout_s=WAIT_S, poll_s=0.2).ok
        inst = cloud.instances[instance_id]
        assert "ec2-trainer-spot-watcher.service" in inst.units, cloud.boot_report()
        watcher_log = inst.disk / "state" / "spot-watcher.log"
        wait_until("the watcher to start", lambda: watcher_log.exists() and "started" in watcher_log.read_text())

        ssh = connect(target, timeout_s=10)
        try:
            _, stdout, _ = ssh.exec_command(ASK_IMDS)
            # 401 without a token, as on EC2 with HttpTokens=required; never 169.254.169.254.
            assert stdout.read().decode() == f"401 {instance_id}"
            _, stdout, _ = ssh.exec_command("echo $AWS_EC2_METADATA_SERVICE_ENDPOINT")
            assert stdout.read().decode().startswith("http://127.0.0.1:")
        finally:
            ssh.close()
        request = inst.disk / "state" / "signals" / "checkpoint-request"
        marker = inst.disk / "state" / "spot-notice"
        assert not request.exists() and not marker.exists(), "no notice, no request"

        send_spot_interruption(cloud, instance_id, warning_s=20)
        notice = wait_until("the checkpoint request", lambda: request.exists() and request.read_text(), 12)
        assert json.loads(notice)["action"] == "terminate"
        ssh = connect(target, timeout_s=10)
        try:
            _, stdout, stderr = ssh.exec_command(READ_AS_THE_JOB.format(state=state))
            read_request, read_marker = stdout.read().decode().split("\n\n")
            assert stdout.channel.recv_exit_status() == 0, stderr.read().decode()
        finally:
            ssh.close()
        assert json.loads(read_request) == json.loads(read_marker) == json.loads(notice)
        assert not request.exists(), "the job removed its request"
        assert marker.exists(), "the orchestrator's marker stays"

        wait_until("the interruption", lambda: describe(cloud, instance_id)["State"]["Name"] == "terminated", 40)
        assert describe(cloud, instance_id)["StateReason"] == {
            "Code": "Server.SpotInstanceTermination",
            "Message": "Server.SpotInstanceTermination: Spot instance termination",
        }
        wait_until("the power-off", lambda: inst.powered_off_at is not None, 10)
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_only_a_running_spot_instance_can_be_interrupted(cloud: LocalCloud) -> None:
    assert cloud.network is not None
    (instance,) = cloud.client("ec2").run_instances(
        ImageId=next(iter(cloud.images.values())), InstanceType="g6.xlarge", MinCount=1, MaxCount=1
    )["Instances"]
    try:
        with pytest.raises(ValueError, match="not a spot instance"):
            send_spot_interruption(cloud, instance["InstanceId"], warning_s=0)
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
