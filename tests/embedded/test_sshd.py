from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from embedded.services.sshd import LoopbackSshd, SshdError, ensure_sshd_installed, render_sshd_config
from orchestrator.instance.ssh import SshTarget, connect
from tests.support.sshd import SshKeyPair


def test_config_allows_public_keys_only(tmp_path: Path) -> None:
    config = render_sshd_config(
        address="127.0.0.1",
        port=2222,
        host_key=tmp_path / "hk",
        pid_file=tmp_path / "pid",
        authorized_keys=tmp_path / "ak",
    )
    lines = set(config.splitlines())
    assert {"ListenAddress 127.0.0.1", "Port 2222", "PasswordAuthentication no", "UsePAM no"} <= lines
    assert {
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"HostKey {tmp_path / 'hk'}",
    } <= lines
    assert "Subsystem sftp internal-sftp" in lines


def test_an_instance_config_is_ubuntus_one_user_no_root_keys_from_home(tmp_path: Path) -> None:
    config = render_sshd_config(
        address="127.0.1.2",
        port=None,
        host_key=tmp_path / "hk",
        pid_file=tmp_path / "pid",
        authorized_keys=None,
        login_user="ec2-trainer",
        drop_in_dir=tmp_path / "sshd_config.d",
    )
    lines = config.splitlines()
    # Drop-ins first, as Ubuntu's sshd_config includes them: their Port decides (22 without one).
    assert lines[0] == f"Include {tmp_path / 'sshd_config.d'}/*.conf"
    assert not any(line.startswith("Port ") for line in lines)
    assert {
        "PermitRootLogin no",
        "AllowUsers ec2-trainer",
        "PasswordAuthentication no",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "StrictModes yes",
    } <= set(lines)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"authorized_keys": None}, "needs the login_user"),
        ({"authorized_keys": None, "login_user": "root"}, "must be an unprivileged user"),
        ({"authorized_keys": ["k"], "port": 2222, "drop_in_dir": Path("/d")}, "not both"),
    ],
)
def test_instance_settings_are_checked(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SshdError, match=message):
        LoopbackSshd("key", workdir=tmp_path, **kwargs)


def test_ensure_sshd_installed_returns_the_binary() -> None:
    assert Path(ensure_sshd_installed()).is_file()


def test_needs_an_authorized_key(tmp_path: Path, ssh_host_keypair: SshKeyPair) -> None:
    with pytest.raises(SshdError, match="at least one authorized public key"):
        LoopbackSshd(ssh_host_keypair.private_pem, [], workdir=tmp_path)


def test_start_serves_logins_and_stop_is_idempotent(
    tmp_path: Path, ssh_host_keypair: SshKeyPair, ssh_client_keypair: SshKeyPair
) -> None:
    sshd = LoopbackSshd(ssh_host_keypair.private_pem, [ssh_client_keypair.public_line], workdir=tmp_path)
    assert ssh_host_keypair.private_pem not in repr(sshd)
    with sshd:
        assert "Server listening on" in sshd.read_log()
        for name in ("ssh_host_ed25519_key", "authorized_keys", "sshd_config"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        target = SshTarget(
            sshd.address, sshd.port, _user(), ssh_host_keypair.public_line, ssh_client_keypair.private_pem
        )
        client = connect(target, timeout_s=5)
        try:
            _, stdout, _ = client.exec_command("echo hello")
            assert stdout.read().decode().strip() == "hello"
        finally:
            client.close()
    sshd.stop()
    with pytest.raises(OSError, match="Unable to connect to port"):
        connect(
            SshTarget(sshd.address, sshd.port, _user(), ssh_host_keypair.public_line, ssh_client_keypair.private_pem),
            timeout_s=2,
        )


def test_start_fails_clearly_when_the_port_is_taken(
    tmp_path: Path, loopback_sshd: LoopbackSshd, ssh_host_keypair: SshKeyPair, ssh_client_keypair: SshKeyPair
) -> None:
    second = LoopbackSshd(
        ssh_host_keypair.private_pem,
        [ssh_client_keypair.public_line],
        port=loopback_sshd.port,
        workdir=tmp_path,
    )
    with pytest.raises(SshdError, match="did not report 'Server listening on'"):
        second.start()
    second.stop()


def _user() -> str:
    import getpass

    return getpass.getuser()
