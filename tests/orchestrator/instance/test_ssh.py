from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from embedded.services.sshd import LoopbackSshd, free_port
from orchestrator.errors import OrchestratorError
from orchestrator.instance.ssh import (
    BootstrapFailedError,
    BootstrapTimeoutError,
    BootstrapWatch,
    HostKeyMismatchError,
    InstanceUnreachableError,
    LineBuffer,
    SshTarget,
    SshTimeoutError,
    connect,
    load_private_key,
    parse_phases,
    parse_public_key,
    wait_for_bootstrap,
    wait_for_ssh,
)
from tests.support.sshd import SshKeyPair, make_ed25519_keypair, pem_armor


def test_target_repr_hides_the_private_key(ssh_target: SshTarget) -> None:
    assert "PRIVATE KEY" not in repr(ssh_target)
    assert "PRIVATE KEY" not in str(ssh_target)
    assert ssh_target.host_key_name == f"[127.0.0.1]:{ssh_target.port}"
    assert dataclasses.replace(ssh_target, port=22).host_key_name == "127.0.0.1"


def test_line_buffer_keeps_partial_lines() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"one\ntw") == ["one"]
    assert buffer.feed(b"o\r\nthr") == ["two"]
    assert buffer.feed(b"") == []
    assert buffer.flush() == ["thr"]
    assert buffer.flush() == []


def test_connect_with_the_pinned_key_runs_commands(ssh_target: SshTarget) -> None:
    client = connect(ssh_target, timeout_s=5)
    try:
        _, stdout, _ = client.exec_command("echo pinned-ok")
        assert stdout.read().decode().strip() == "pinned-ok"
        transport = client.get_transport()
        assert transport is not None and transport.is_authenticated()
    finally:
        client.close()


def test_wrong_host_key_refuses_before_any_command(ssh_target: SshTarget, tmp_path: Path) -> None:
    impostor_key = make_ed25519_keypair().public_line
    marker = tmp_path / "command-ran"
    with pytest.raises(HostKeyMismatchError, match="possible man-in-the-middle or a reused IP; not connecting") as err:
        client = connect(dataclasses.replace(ssh_target, host_public_key=impostor_key), timeout_s=5)
        client.exec_command(f"touch {marker}")
    assert not marker.exists()
    message = str(err.value)
    assert message.count("SHA256:") == 2 and "expected ssh-ed25519" in message


def test_wait_for_ssh_fails_at_once_on_a_host_key_mismatch(ssh_target: SshTarget) -> None:
    started = time.monotonic()
    with pytest.raises(HostKeyMismatchError, match="not connecting"):
        wait_for_ssh(
            dataclasses.replace(ssh_target, host_public_key=make_ed25519_keypair().public_line),
            timeout_s=30,
            poll_s=0.1,
        )
    assert time.monotonic() - started < 20  # not retried until the 30 s timeout


def test_wait_for_ssh_waits_for_a_late_server(
    tmp_path: Path, ssh_host_keypair: SshKeyPair, ssh_client_keypair: SshKeyPair, ssh_target: SshTarget
) -> None:
    port = free_port()
    sshd = LoopbackSshd(ssh_host_keypair.private_pem, [ssh_client_keypair.public_line], port=port, workdir=tmp_path)
    starter = threading.Timer(1.0, sshd.start)
    started = time.monotonic()
    starter.start()
    try:
        wait_for_ssh(dataclasses.replace(ssh_target, port=port), timeout_s=15, poll_s=0.2)
        assert time.monotonic() - started >= 0.9
    finally:
        starter.join()
        sshd.stop()


def test_wait_for_ssh_times_out_with_the_last_error(ssh_target: SshTarget, caplog: pytest.LogCaptureFixture) -> None:
    target = dataclasses.replace(ssh_target, port=free_port())
    timeout = pytest.raises(SshTimeoutError, match=r"within 1s \(\d+ attempts; last error: .*security group")
    with caplog.at_level("INFO", logger="orchestrator.instance.ssh"), timeout as err:
        wait_for_ssh(target, timeout_s=1, poll_s=0.1)
    # Several attempts, one "not ready yet" line: the same refusal is not repeated every poll.
    attempts = int(re.search(r"\((\d+) attempts", str(err.value)).group(1))  # type: ignore[union-attr]
    assert attempts > 3
    assert len([r for r in caplog.records if "not ready yet" in r.getMessage()]) == 1


def _write_later(path: Path, text: str, delay_s: float) -> threading.Timer:
    timer = threading.Timer(delay_s, path.write_text, args=(text,))
    timer.start()
    return timer


def test_bootstrap_ok_streams_the_log(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    (remote_state_dir / "bootstrap.log").write_text("step 1\nstep 2\n")
    (remote_state_dir / "bootstrap.phases").write_text("user 0\ngpu 2\npackages 31\n")
    timer = _write_later(remote_state_dir / "bootstrap.status", "ok\n", 0.5)
    seen: list[str] = []
    result = wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=10, poll_s=0.1, on_log=seen.append)
    timer.join()
    assert result.ok and result.status_line == "ok"
    assert seen == ["step 1", "step 2"]
    assert result.log_tail == "step 1\nstep 2"
    assert result.elapsed_s >= 0.4
    assert result.phases_s == {"user": 0.0, "gpu": 2.0, "packages": 31.0}


def test_the_polls_sftp_sessions_leave_no_info_lines_in_the_log(
    ssh_target: SshTarget, remote_state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each poll opens an SFTP session, which paramiko announced at INFO twice: wait_ready's log held 16 such
    "[chan N] Opened sftp connection" / "sftp session closed" lines."""
    (remote_state_dir / "bootstrap.log").write_text("step 1\n")
    timer = _write_later(remote_state_dir / "bootstrap.status", "ok\n", 0.5)
    with caplog.at_level(logging.INFO):
        wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=10, poll_s=0.1)
    timer.join()
    assert [r.getMessage() for r in caplog.records if "[chan" in r.getMessage()] == []
    assert logging.getLogger("paramiko.transport.sftp").isEnabledFor(logging.WARNING)


def test_bootstrap_phases_written_by_the_instance_are_not_trusted() -> None:
    text = "user 1\nuser 2\n$(rm -rf /) 3\ngpu -1\ngpu 1.5\npython\n\npython 4 extra\npackages 7\n"
    assert parse_phases(text) == {"user": 3.0, "packages": 7.0}
    assert parse_phases(None) == {}


def test_bootstrap_error_raises_with_the_log_tail(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    (remote_state_dir / "bootstrap.log").write_text("".join(f"log line {i}\n" for i in range(100)))
    (remote_state_dir / "bootstrap.status").write_text("error: install-mlflow: pip exited with 1\n")
    with pytest.raises(BootstrapFailedError, match="error: install-mlflow: pip exited with 1") as err:
        wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=10, poll_s=0.1)
    assert "log line 99" in str(err.value) and "log line 60" in str(err.value)
    assert "log line 59\n" not in str(err.value)


def test_bootstrap_without_a_marker_times_out(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    (remote_state_dir / "bootstrap.log").write_text("installing drivers\n")
    with pytest.raises(BootstrapTimeoutError, match=r"no marker .* within 1s(.|\n)*installing drivers"):
        wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=1, poll_s=0.2)


def test_a_bootstrap_wait_that_loses_ssh_for_a_while_says_so_and_resumes_where_it_stopped(
    ssh_target: SshTarget, remote_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSH answered and the log's first line streamed, then every poll fails (EC2 took the spot instance back): after
    UNREACHABLE_AFTER_S the wait says so with the log offset it reached, for the caller to ask EC2. A wait resumed
    from that offset streams only the new lines."""
    log = remote_state_dir / "bootstrap.log"
    log.write_text("step 1\n")
    monkeypatch.setattr("orchestrator.instance.ssh.UNREACHABLE_AFTER_S", 0.5)
    original = BootstrapWatch.poll
    polls: list[float] = []

    def failing_after_the_first(self: BootstrapWatch, client: object, *, with_tail: bool = False) -> tuple[str, str]:
        polls.append(time.monotonic())
        if len(polls) > 1:
            raise ConnectionResetError("connection reset by peer")
        return original(self, client, with_tail=with_tail)  # type: ignore[arg-type]

    monkeypatch.setattr(BootstrapWatch, "poll", failing_after_the_first)
    seen: list[str] = []
    with pytest.raises(InstanceUnreachableError, match=r"has failed for \d+ s during the bootstrap") as err:
        wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=30, poll_s=0.1, on_log=seen.append)
    assert seen == ["step 1"]
    assert err.value.log_offset == len("step 1\n")
    assert polls[-1] - polls[1] >= 0.5, "it kept trying for UNREACHABLE_AFTER_S"

    monkeypatch.setattr(BootstrapWatch, "poll", original)
    log.write_text("step 1\nstep 2\n")
    (remote_state_dir / "bootstrap.status").write_text("ok\n")
    seen.clear()
    wait_for_bootstrap(
        ssh_target, str(remote_state_dir), timeout_s=10, poll_s=0.1, on_log=seen.append, log_offset=err.value.log_offset
    )
    assert seen == ["step 2"]


def test_private_keys_of_each_supported_type_load() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    for key in (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
    ):
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        assert load_private_key(pem).get_bits() in (2048, 256)
    assert load_private_key(make_ed25519_keypair().private_pem).get_name() == "ssh-ed25519"


def test_bad_keys_fail_with_a_message_that_hides_them() -> None:
    with pytest.raises(OrchestratorError, match="could not be loaded") as err:
        load_private_key(pem_armor("not-a-key"))
    assert "not-a-key" not in str(err.value)
    with pytest.raises(OrchestratorError, match="OpenSSH public key line like"):
        parse_public_key("ssh-ed25519")
    with pytest.raises(OrchestratorError, match="could not be parsed"):
        parse_public_key("ssh-ed25519 bm90LWEta2V5")
