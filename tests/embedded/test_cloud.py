"""embedded.cloud: moto as EC2 plus the instance emulator, driven only through boto3 and SSH, as the orchestrator is."""

from __future__ import annotations

import pwd
import shlex
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

from embedded.cloud import UBUNTU_DLAMI, EmulatedInstance, LocalCloud
from embedded.deploy.stack import EmbeddedStack
from embedded.process import free_port
from orchestrator.cloud.hostkeys import HostKey, generate_host_key
from orchestrator.cloud.user_data import UserDataSpec, cloud_config, render_user_data
from orchestrator.instance.ssh import HostKeyMismatchError, SshTarget, connect, wait_for_bootstrap
from tests.support.sshd import SshKeyPair, make_ed25519_keypair
from tests.support.tools import require_root

PROJECT_TAG = {"Key": "ec2-trainer:project", "Value": "ec2-trainer"}
# Generous: a boot imports torch, which takes many seconds on a loaded 2-core machine.
WAIT_S = 120.0


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


@pytest.fixture
def ssh_port(cloud: LocalCloud) -> int:
    """The port the stack's security group admits (a free one, not 22): instances must listen where their user-data
    says."""
    return cloud.ssh_port


def user_data_spec(
    cloud: LocalCloud, host_key: HostKey, client_key: SshKeyPair, ssh_port: int, deadline_in_s: int = 3600
) -> UserDataSpec:
    return UserDataSpec(
        host_key=host_key,
        authorized_public_key=client_key.public_line,
        ssh_user=cloud.login_user,
        deadline_epoch=int(time.time()) + deadline_in_s,
        state_dir=str(cloud.disk_root / "state"),
        python_bin=sys.executable,
        require_gpu=False,
        ssh_port=ssh_port,
    )


def launch(
    cloud: LocalCloud,
    host_key: HostKey,
    client_key: SshKeyPair,
    ssh_port: int,
    *,
    deadline_in_s: int = 3600,
    tags: list[dict[str, str]] | None = None,
    user_data: str | None = None,
    spot: bool = False,
) -> str:
    """Launches a g6.xlarge with user-data (the spec's, unless given), on-demand or as a one-time spot request."""
    spec = user_data_spec(cloud, host_key, client_key, ssh_port, deadline_in_s)
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
        UserData=user_data if user_data is not None else render_user_data(spec),
        InstanceInitiatedShutdownBehavior="terminate",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags if tags is not None else [PROJECT_TAG]}],
        **({"InstanceMarketOptions": {"MarketType": "spot"}} if spot else {}),
    )
    return str(response["Instances"][0]["InstanceId"])


def describe(cloud: LocalCloud, instance_id: str) -> dict[str, Any]:
    reservations = cloud.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return dict(reservations[0]["Instances"][0])


def target_of(
    cloud: LocalCloud, instance_id: str, host_public_key: str, client_key: SshKeyPair, ssh_port: int, user: str = ""
) -> SshTarget:
    # The loopback "public IP" is set inside RunInstances, as EC2 does: never a moment without it.
    address = str(describe(cloud, instance_id)["PublicIpAddress"])
    assert address.startswith("127.0."), address
    return SshTarget(
        host=address,
        port=ssh_port,
        user=user or cloud.login_user,
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


def test_instance_boots_serves_pinned_ssh_and_dies_on_terminate(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int
) -> None:
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key, ssh_port)
    target = target_of(cloud, instance_id, host_key.public_line, client_key, ssh_port)
    assert target.host.startswith("127.0.")
    assert target.host != "127.0.0.1"

    result = wait_for_bootstrap(target, str(cloud.disk_root / "state"), timeout_s=WAIT_S, poll_s=0.2)
    assert result.ok
    assert result.status_line == "ok"

    # A detached job that records the SIGTERM of the OS shutdown EC2's terminate starts, before the power goes.
    signal_file = f"{cloud.disk_root}/state/jobs/got-sigterm"
    job = f"trap 'echo TERM > {signal_file}; exit 143' TERM; while :; do sleep 0.1; done"
    ssh = connect(target, timeout_s=10)
    try:
        _, stdout, _ = ssh.exec_command(f"nohup setsid bash -c {shlex.quote(job)} >/dev/null 2>&1 </dev/null & echo $!")
        sleeper = int(stdout.read().decode().strip())
    finally:
        ssh.close()
    assert pid_alive(sleeper)

    with pytest.raises(HostKeyMismatchError, match=r"."):
        connect(target_of(cloud, instance_id, generate_host_key().public_line, client_key, ssh_port), timeout_s=10)

    cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])
    wait_until("the detached job to be killed", lambda: not pid_alive(sleeper))
    wait_until("the instance's sshd to stop listening", lambda: not listening(target.host, target.port))
    assert describe(cloud, instance_id)["State"]["Name"] == "terminated"
    disk = cloud.instances[instance_id].disk
    assert (disk / "state" / "jobs" / "got-sigterm").read_text() == "TERM\n", "SIGTERM first, as an OS shutdown does"


def test_an_instance_boots_at_its_address_however_slow_run_instances_is(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int, monkeypatch: pytest.MonkeyPatch
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
    instance_id = launch(cloud, host_key, client_key, ssh_port)
    target = target_of(cloud, instance_id, host_key.public_line, client_key, ssh_port)
    try:
        booted = wait_until("the emulator to boot the instance", lambda: cloud.instances.get(instance_id))
        assert booted.address == target.host
        assert wait_for_bootstrap(target, str(cloud.disk_root / "state"), timeout_s=WAIT_S, poll_s=0.2).ok
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_watchdog_deadline_powers_the_instance_off(cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int) -> None:
    instance_id = launch(cloud, generate_host_key(), client_key, ssh_port, deadline_in_s=2)
    wait_until(
        "the watchdog to power the instance off (terminate)",
        lambda: describe(cloud, instance_id)["State"]["Name"] == "terminated",
        timeout_s=20,
    )
    assert cloud.instances[instance_id].powered_off_at is not None
    # As EC2 tells a shutdown from inside the OS apart from an API call: what the orchestrator explains to the user.
    reason = describe(cloud, instance_id)["StateReason"]
    assert reason["Code"] == "Client.InstanceInitiatedShutdown", reason


def test_untagged_instances_are_ignored(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tick = cloud._tick
    launched: list[str] = []
    seen_by_ticks: list[bool] = []  # one entry per emulator tick begun after the launch returned

    def counted_tick() -> None:
        began_after_launch = bool(launched)
        listed = {i.id for i in cloud._backend().all_instances()}
        tick()
        if began_after_launch:
            seen_by_ticks.append(launched[0] in listed)

    monkeypatch.setattr(cloud, "_tick", counted_tick)
    launched.append(launch(cloud, generate_host_key(), client_key, ssh_port, tags=[{"Key": "team", "Value": "other"}]))
    instance_id = launched[0]
    # Three whole ticks that listed the instance: each would have booted a project instance.
    wait_until("three emulator ticks after the launch", lambda: len(seen_by_ticks) >= 3)
    assert all(seen_by_ticks), "the emulator's ticks did not list the instance: its not booting proves nothing"
    assert instance_id not in cloud.instances
    assert not describe(cloud, instance_id).get("PublicIpAddress", "").startswith("127.")
    cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_watchdog_powers_the_instance_off_even_when_runcmd_fails(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int
) -> None:
    """The watchdog is a systemd unit started from cloud-init's init stage: a failing (or never reached) runcmd, the
    last stage, must not take the lifetime bound with it."""
    config = cloud_config(user_data_spec(cloud, generate_host_key(), client_key, ssh_port, deadline_in_s=3))
    config["runcmd"] = [["sh", "-c", "exit 1"]]
    instance_id = launch(
        cloud, generate_host_key(), client_key, ssh_port, user_data="#cloud-config\n" + yaml.dump(config)
    )
    wait_until(
        "the watchdog to power the instance off (terminate)",
        lambda: describe(cloud, instance_id)["State"]["Name"] == "terminated",
        timeout_s=20,
    )
    inst = cloud.instances[instance_id]
    assert inst.runcmd_exit_codes == [1]
    assert list(inst.units) == [
        "ec2-trainer-watchdog.service",
        "ec2-trainer-spot-watcher.service",
        "ec2-trainer-guard.service",
    ]
    watchdog_log = cloud.host_path(inst, cloud.disk_root / "state" / "watchdog.log")
    assert "reached: powering off" in watchdog_log.read_text()
    assert watchdog_log.stat().st_uid == 0, "systemd runs the watchdog as root"


def test_instance_listens_on_the_port_its_user_data_sets(cloud: LocalCloud, client_key: SshKeyPair) -> None:
    port = free_port()
    assert cloud.network is not None
    # A second inbound rule on the stack's group, for this port only (the group's rule for the stack's port stays).
    cloud.client("ec2").authorize_security_group_ingress(
        GroupId=cloud.network.security_group_id,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": "127.0.0.1/32"}]}
        ],
    )
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key, port)
    try:
        target = target_of(cloud, instance_id, host_key.public_line, client_key, port)
        assert wait_for_bootstrap(target, str(cloud.disk_root / "state"), timeout_s=WAIT_S, poll_s=0.2).ok
        assert cloud.instances[instance_id].sshd is not None
        assert cloud.instances[instance_id].sshd.port == port  # type: ignore[union-attr]
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_logins_only_as_the_unprivileged_user_with_what_it_needs(
    cloud: LocalCloud, client_key: SshKeyPair, ssh_port: int
) -> None:
    """As on an Ubuntu instance: cloud-init works as root, SSH lets in only the default user, keyed from its home."""
    require_root("an unprivileged login user can only be made as root")
    host_key = generate_host_key()
    instance_id = launch(cloud, host_key, client_key, ssh_port)
    try:
        target = target_of(cloud, instance_id, host_key.public_line, client_key, ssh_port)
        state = cloud.disk_root / "state"
        assert wait_for_bootstrap(target, str(state), timeout_s=WAIT_S, poll_s=0.2).ok
        with pytest.raises(paramiko.AuthenticationException, match="Authentication failed"):
            connect(
                target_of(cloud, instance_id, host_key.public_line, client_key, ssh_port, user="root"), timeout_s=10
            )

        inst = cloud.instances[instance_id]
        user = pwd.getpwnam(cloud.login_user)
        assert user.pw_uid != 0
        ssh_dir = cloud.home_of(inst) / ".ssh"
        for path, mode in ((ssh_dir, 0o700), (ssh_dir / "authorized_keys", 0o600)):
            assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (user.pw_uid, mode), path
        # write_files made the missing parents as cloud-init does; the bootstrap (runcmd) ran as root.
        for folder in (state, state / "bin"):
            info = cloud.host_path(inst, folder).stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o755), folder
        assert cloud.host_path(inst, state / "bootstrap.log").stat().st_uid == 0

        ssh = connect(target, timeout_s=10)
        try:
            script = (
                f"id -un; echo $HOME; mkdir -p {state}/jobs/probe && echo made; touch {state}/probe || echo refused"
            )
            _, stdout, _ = ssh.exec_command(script)
            lines = stdout.read().decode().split()
        finally:
            ssh.close()
        assert lines == [cloud.login_user, user.pw_dir, "made", "refused"]
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[instance_id])


def test_only_an_instance_with_a_profile_gets_aws_credentials(stack: EmbeddedStack, tmp_path: Path) -> None:
    # On EC2 an instance's SDKs get credentials from its instance profile (through the metadata service), or none.
    bare = EmulatedInstance("i-0", "127.0.0.2", tmp_path, tmp_path)
    profiled = EmulatedInstance("i-1", "127.0.0.3", tmp_path, tmp_path, has_instance_profile=True)
    assert "AWS_ACCESS_KEY_ID" not in stack.cloud.cloud_init.aws_env(bare)
    assert f"AWS_ENDPOINT_URL={stack.cloud.endpoint_url}" in stack.cloud.cloud_init.aws_env(bare)
    role = stack.cloud.instance_role
    assert (
        f"AWS_ACCESS_KEY_ID={role.access_key} AWS_SECRET_ACCESS_KEY={role.secret_key}"
        in stack.cloud.cloud_init.aws_env(profiled)
    )


@pytest.mark.parametrize("encoding", ["gz+b64", "gzip+base64", "b64", None])
def test_write_files_content_is_decoded_as_cloud_init_does(encoding: str | None) -> None:
    import base64
    import gzip

    from embedded.cloud.cloud_init import written_bytes

    script = b"#!/usr/bin/env bash\necho ok\n"
    if encoding is None:
        entry = {"path": "/x", "content": script.decode()}
    elif "gz" in encoding:
        entry = {"path": "/x", "encoding": encoding, "content": base64.b64encode(gzip.compress(script)).decode()}
    else:
        entry = {"path": "/x", "encoding": encoding, "content": base64.b64encode(script).decode()}
    assert written_bytes(entry) == script


def test_write_files_with_an_encoding_cloud_init_lacks_is_not_written() -> None:
    from embedded.cloud.cloud_init import written_bytes

    assert written_bytes({"path": "/x", "encoding": "zstd", "content": "AAAA"}) is None
