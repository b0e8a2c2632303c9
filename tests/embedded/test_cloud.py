"""embedded.cloud: moto as EC2 plus the instance emulator, driven only through boto3 and SSH, as the orchestrator is."""

from __future__ import annotations

import getpass
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedded.cloud import UBUNTU_DLAMI, LocalCloud
from embedded.stack import EmbeddedStack
from orchestrator.hostkeys import HostKey, generate_host_key
from orchestrator.ssh import HostKeyMismatchError, SshTarget, connect, wait_for_bootstrap
from orchestrator.userdata import UserDataSpec, render_user_data
from tests.sshd_fixtures import SshKeyPair, make_ed25519_keypair

PROJECT_TAG = {"Key": "ec2-trainer:project", "Value": "ec2-trainer"}
WAIT_S = 30.0


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture
def cloud(stack: EmbeddedStack) -> LocalCloud:
    """The session's cloud: moto keeps one EC2 state per process, so every test shares one emulator."""
    return stack.cloud


@pytest.fixture(scope="module")
def client_key() -> SshKeyPair:
    return make_ed25519_keypair()


def launch(
    cloud: LocalCloud,
    host_key: HostKey,
    client_key: SshKeyPair,
    *,
    deadline_in_s: int = 3600,
    tags: list[dict[str, str]] | None = None,
) -> str:
    spec = UserDataSpec(
        host_key=host_key,
        authorized_public_key=client_key.public_line,
        ssh_user=getpass.getuser(),
        deadline_epoch=int(time.time()) + deadline_in_s,
        state_dir=str(cloud.disk_root / "state"),
        python_bin=sys.executable,
        require_gpu=False,
    )
    assert cloud.network is not None
    response = cloud.client("ec2").run_instances(
        ImageId=cloud.images[UBUNTU_DLAMI.parameter],
        InstanceType="g6.xlarge",
        MinCount=1,
        MaxCount=1,
        NetworkInterfaces=[
            {
                "DeviceIndex": 0,
                "SubnetId": cloud.network.subnet_id,
                "Groups": [cloud.network.security_group_id],
                "AssociatePublicIpAddress": True,
            }
        ],
        UserData=render_user_data(spec),
        InstanceInitiatedShutdownBehavior="terminate",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags if tags is not None else [PROJECT_TAG]}],
    )
    return str(response["Instances"][0]["InstanceId"])


def describe(cloud: LocalCloud, instance_id: str) -> dict[str, Any]:
    reservations = cloud.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return dict(reservations[0]["Instances"][0])


def target_of(cloud: LocalCloud, instance_id: str, host_public_key: str, client_key: SshKeyPair) -> SshTarget:
    # The loopback "public IP" is set inside RunInstances, as EC2 does: never a moment without it.
    address = str(describe(cloud, instance_id)["PublicIpAddress"])
    assert address.startswith("127.0."), address
    return SshTarget(
        host=address,
        port=cloud.ssh_port,
        user=getpass.getuser(),
        host_public_key=host_public_key,
        private_key_pem=client_key.private_pem,
    )


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a killed child of sshd may linger as one until reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_instance_boots_serves_pinned_ssh_and_dies_on_terminate(cloud: LocalCloud, client_key: SshKeyPair) -> None:
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key)
    target = target_of(cloud, instance_id, host_key.public_line, client_key)
    assert target.host.startswith("127.0.")
    assert target.host != "127.0.0.1"

    result = wait_for_bootstrap(target, str(cloud.disk_root / "state"), timeout_s=WAIT_S, poll_s=0.2)
    assert result.ok
    assert result.status_line == "ok"

    ssh = connect(target, timeout_s=10)
    try:
        _, stdout, _ = ssh.exec_command("nohup setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!")
        sleeper = int(stdout.read().decode().strip())
    finally:
        ssh.close()
    assert pid_alive(sleeper)

    with pytest.raises(HostKeyMismatchError, match=r"."):
        connect(target_of(cloud, instance_id, generate_host_key().public_line, client_key), timeout_s=10)

    cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])
    wait_until("the detached job to be killed", lambda: not pid_alive(sleeper))
    wait_until("the instance's sshd to stop listening", lambda: not listening(target.host, target.port))
    assert describe(cloud, instance_id)["State"]["Name"] == "terminated"


def test_an_instance_boots_at_its_address_however_slow_run_instances_is(
    cloud: LocalCloud, client_key: SshKeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto lists an instance before RunInstances returns; a loaded machine widens that window. Here it spans several
    emulator polls: the instance must still boot at the address RunInstances gave it, not at moto's own."""
    from moto.ec2.models.instances import Instance

    setup_defaults = Instance.setup_defaults

    def slow_setup_defaults(self: Any) -> None:  # runs after the instance is listed and tagged, before the return
        time.sleep(5 * cloud.poll_s)
        setup_defaults(self)

    monkeypatch.setattr(Instance, "setup_defaults", slow_setup_defaults)
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key)
    target = target_of(cloud, instance_id, host_key.public_line, client_key)
    try:
        booted = wait_until("the emulator to boot the instance", lambda: cloud.instances.get(instance_id))
        assert booted.address == target.host
        assert wait_for_bootstrap(target, str(cloud.disk_root / "state"), timeout_s=WAIT_S, poll_s=0.2).ok
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_watchdog_deadline_powers_the_instance_off(cloud: LocalCloud, client_key: SshKeyPair) -> None:
    instance_id = launch(cloud, generate_host_key(), client_key, deadline_in_s=2)
    wait_until(
        "the watchdog to power the instance off (terminate)",
        lambda: describe(cloud, instance_id)["State"]["Name"] == "terminated",
        timeout_s=20,
    )
    assert cloud.instances[instance_id].powered_off_at is not None


def test_untagged_instances_are_ignored(cloud: LocalCloud, client_key: SshKeyPair) -> None:
    instance_id = launch(cloud, generate_host_key(), client_key, tags=[{"Key": "team", "Value": "other"}])
    # Give the emulator several polls in which it would have booted a project instance.
    time.sleep(1.0)
    assert instance_id not in cloud.instances
    assert not describe(cloud, instance_id).get("PublicIpAddress", "").startswith("127.")
    cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])
