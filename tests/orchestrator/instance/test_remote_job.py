from __future__ import annotations

import io
import re
import secrets
import shlex
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConfigError
from orchestrator.instance.job_script import (
    JobPaths,
    build_env_file,
    build_job_script,
    build_start_command,
    job_dir_for,
    job_key,
)
from orchestrator.instance.remote_job import (
    RemoteJob,
    RemoteJobError,
    RemoteJobLostError,
    RemoteJobTimeoutError,
)
from orchestrator.instance.ssh import HostKeyMismatchError, SshTarget, connect, transient_ssh_errors

FIVE_LINES_EXIT_3 = ["bash", "-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done; exit 3"]

# ---- pure builders -------------------------------------------------------------------------------------------


def test_job_key_is_stable_safe_and_distinct() -> None:
    key = job_key("train_cnn", "manual__2026-05-01T10:00:00+00:00")
    assert key == job_key("train_cnn", "manual__2026-05-01T10:00:00+00:00")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key)
    assert key.startswith("train_cnn--manual__2026-05-01T10-00-00-00-00-")
    assert key != job_key("train_cnn", "manual__2026-05-01T10:00:01+00:00")
    # The hash keeps keys distinct even when the slugs collide or are cut.
    assert job_key("a", "b:c") != job_key("a", "b/c")
    assert job_key("d" * 200, "x") != job_key("d" * 200, "y")
    assert re.fullmatch(r"[0-9a-f]{16}", job_key("../", "..."))
    # At least 64 bits of digest after the cut slug: two long run ids sharing a prefix stay apart.
    assert re.fullmatch(r".*-[0-9a-f]{16}", job_key("d" * 200, "x"))


def test_job_dir_for_rejects_unsafe_keys() -> None:
    assert job_dir_for("/var/lib/trainer", "k-1").exit_code == "/var/lib/trainer/jobs/k-1/exit_code"
    with pytest.raises(ConfigError, match="must be made of letters"):
        job_dir_for("/var/lib/trainer", "../etc")


def test_env_file_round_trips_through_bash_without_interpretation(tmp_path: Path) -> None:
    tricky = {"A": "plain", "B": 'it\'s $(touch pwned) `x` "q"', "C_2": "multi\nline", "EMPTY": ""}
    env_file = tmp_path / "env"
    env_file.write_text(build_env_file(tricky))
    printed = subprocess.run(
        ["bash", "-c", f'set -a; . {env_file}; set +a; printf \'%s\\0\' "$A" "$B" "$C_2" "$EMPTY"'],
        capture_output=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert printed.split(b"\0")[:-1] == [v.encode() for v in tricky.values()]
    assert not (tmp_path / "pwned").exists()


# "A\n": `re.match` with `$` accepts a trailing newline, and sourcing `A\n='v'` runs `='v'` as a command.
@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "X;rm", "A\n", "PATH\nid"])
def test_env_file_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"name .* is invalid"):
        build_env_file({name: "v"})


def test_env_file_error_never_shows_the_value() -> None:
    with pytest.raises(ConfigError, match="TOKEN for the remote job contains a NUL byte") as err:
        build_env_file({"TOKEN": "s3cret\0"})
    assert "s3cret" not in str(err.value)


def test_job_script_quotes_the_command_and_records_the_exit_code_atomically() -> None:
    paths = JobPaths("/state/jobs/k")
    script = build_job_script(["mlflow", "run", "repo; rm -rf /"], paths, "/srv/train dir", "/opt/env.sh")
    assert "mlflow run 'repo; rm -rf /' >> /state/jobs/k/output.log 2>&1 < /dev/null" in script
    assert "set -a; . /state/jobs/k/job.env; set +a; rm -f /state/jobs/k/job.env" in script
    assert "cd '/srv/train dir'" in script and "unset SSH_CLIENT SSH2_CLIENT SSH_CONNECTION" in script
    assert "mv -f /state/jobs/k/exit_code.tmp /state/jobs/k/exit_code" in script
    with pytest.raises(ConfigError, match="command is empty"):
        build_job_script([], paths, None, None)


def test_job_script_quotes_the_workdir_in_its_failure_message(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path))
    workdir = str(tmp_path / "no such dir' ; touch pwned ; echo '")
    (tmp_path / "job.sh").write_text(build_job_script(["true"], paths, workdir, None))
    run = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / "output.log").read_text() == f"job: cannot cd to {workdir}\n"
    assert (tmp_path / "exit_code").read_text() == "1\n"


def test_a_cost_capped_job_waits_for_the_guard_to_hold_its_deadline(tmp_path: Path) -> None:
    """The job's command runs only once the guard's file names this job; the job's own folder could lose the
    cost-deadline file at any time, root's file cannot."""
    paths, held = JobPaths(str(tmp_path / "job")), tmp_path / "guard-cost-held"
    Path(paths.job_dir).mkdir()
    script = Path(paths.script)
    script.write_text(build_job_script(["echo", "trained"], paths, None, None, guard_cost_held=str(held)))
    held.write_text(f"{tmp_path}/another-job\n")
    job = subprocess.Popen(["bash", str(script)])
    time.sleep(2.5)
    assert job.poll() is None, "started while the guard held another job's deadline"
    assert not Path(paths.log).exists()
    # The guard spells the folder from its own state_dir, which may end in '/'.
    held.write_text(f"{tmp_path}//job/\n")
    assert job.wait(timeout=10) == 0
    assert Path(paths.log).read_text() == "trained\n"


def test_a_cost_capped_job_the_guard_never_takes_up_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("orchestrator.instance.job_script.GUARD_WAIT_S", 2)
    paths = JobPaths(str(tmp_path))
    script = build_job_script(["touch", "trained"], paths, None, None, guard_cost_held=str(tmp_path / "no-guard"))
    (tmp_path / "job.sh").write_text(script)
    run = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, check=False, timeout=30)
    assert run.returncode == 1
    assert not (tmp_path / "trained").exists()
    assert (tmp_path / "exit_code").read_text() == "1\n"
    assert (tmp_path / "output.log").read_text() == (
        "job: the instance's guard did not take up the cost deadline within 2 s, so training.max_cost_usd could "
        "not hold: the job does not start (see guard.log in the state folder)\n"
    )


def test_a_job_without_a_cost_cap_does_not_wait_for_the_guard() -> None:
    assert "guard" not in build_job_script(["true"], JobPaths("/state/jobs/k"), None, None)


def test_the_start_command_places_the_cost_deadline_before_the_job_starts(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path))
    for suffix in ("first", "second"):
        Path(paths.upload(paths.cost_deadline, suffix)).write_text(f"{suffix}\n")
        # The job sees its deadline in place as it starts.
        Path(paths.upload(paths.script, suffix)).write_text(f"cp {paths.cost_deadline} {tmp_path}/seen\n")
        subprocess.run(["bash", "-c", build_start_command(paths, suffix)], capture_output=True, check=True)
    _wait_until(lambda: (tmp_path / "seen").exists() and (tmp_path / "seen").read_text().endswith("\n"))
    assert (tmp_path / "seen").read_text() == "first\n"
    assert Path(paths.cost_deadline).read_text() == "first\n", "an attaching caller never replaces it"
    assert not Path(paths.upload(paths.cost_deadline, "second")).exists()


def test_start_command_starts_once(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path))
    outcomes = []
    for suffix in ("first", "second"):
        Path(paths.upload(paths.script, suffix)).write_text(f"echo {suffix} >> {tmp_path}/ran\n")
        run = subprocess.run(
            ["bash", "-c", build_start_command(paths, suffix)], capture_output=True, text=True, check=True
        )
        outcomes.append(run.stdout.strip())
    assert outcomes == ["started", "attached"]
    # `>>` creates the file before echo writes to it: wait for a whole line, not for the file.
    _wait_until(lambda: (tmp_path / "ran").exists() and (tmp_path / "ran").read_text().endswith("\n"))
    assert (tmp_path / "ran").read_text() == "first\n"
    assert not Path(paths.upload(paths.script, "second")).exists()


# ---- against the loopback sshd -------------------------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# ---- the reconnect policy, against a connect that fails -----------------------------------------------------


class Refusing:
    """A connect that fails with `error` and counts its calls, and an on_disconnect that records what it saw."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.connects = 0
        self.reported: list[BaseException] = []

    def connect(self) -> Any:
        self.connects += 1
        raise self.error


def _refused(refusing: Refusing, **kwargs: Any) -> RemoteJob:
    return RemoteJob(refusing.connect, job_dir_for("/state", "job"), on_disconnect=refusing.reported.append, **kwargs)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The reconnect pauses, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


def test_a_lost_connection_is_retried_with_backoff_then_given_up(
    sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    refusing = Refusing(ConnectionRefusedError("refused"))
    with caplog.at_level("WARNING"), pytest.raises(RemoteJobError, match=r"after 7 attempts \(last error: Conn") as err:
        _refused(refusing, max_reconnects=7, reconnect_backoff_s=2.0).exit_code()
    # Doubling from the backoff, capped at 32 times it; every loss reported, the last one too.
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 64.0]
    assert refusing.connects == len(refusing.reported) == 8
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
    warnings = [r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert warnings[0].endswith("failed (ConnectionRefusedError: refused); reconnecting in 2.0s (attempt 1 of 7)")
    assert len(warnings) == 7


def test_on_disconnect_stops_the_reconnects(sleeps: list[float]) -> None:
    refusing = Refusing(ConnectionResetError("reset"))

    def instance_gone(exc: BaseException) -> None:
        raise RemoteJobLostError("the instance is gone")

    job = RemoteJob(refusing.connect, job_dir_for("/state", "job"), on_disconnect=instance_gone)
    with pytest.raises(RemoteJobLostError, match="the instance is gone"):
        job.read_log()
    assert (refusing.connects, sleeps) == (1, [])


def test_a_host_key_mismatch_is_never_retried(sleeps: list[float]) -> None:
    refusing = Refusing(HostKeyMismatchError("not connecting"))
    with pytest.raises(HostKeyMismatchError):
        _refused(refusing).stream(lambda _line: None, timeout_s=5)
    assert (refusing.connects, refusing.reported, sleeps) == (1, [], [])


def _job(ssh_target: SshTarget, state: Path, key: str = "job", **kwargs: Any) -> RemoteJob:
    options: dict[str, Any] = {"poll_s": 0.1, "reconnect_backoff_s": 0.05, **kwargs}
    return RemoteJob(lambda: connect(ssh_target, timeout_s=5), job_dir_for(str(state), key), **options)


def _remote(ssh_target: SshTarget, command: str) -> str:
    client = connect(ssh_target, timeout_s=5)
    try:
        _, stdout, _ = client.exec_command(command)
        return stdout.read().decode()
    finally:
        client.close()


def test_job_streams_lines_in_order_and_returns_the_exit_code(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    job = _job(ssh_target, remote_state_dir)
    try:
        assert job.start_or_attach(FIVE_LINES_EXIT_3) is True
        lines: list[str] = []
        assert job.stream(lines.append, timeout_s=20) == 3
        assert lines == [f"line {i}" for i in range(1, 6)]
        assert job.read_log() == "".join(f"line {i}\n" for i in range(1, 6))
        assert job.exit_code() == 3
        assert stat.S_IMODE(Path(job.paths.job_dir).stat().st_mode) == 0o700
    finally:
        job.close()


def test_the_cost_deadline_is_replaced_whole_and_the_guard_s_reason_read(
    ssh_target: SshTarget, remote_state_dir: Path
) -> None:
    """train's write of the job's cost-deadline (the guard re-reads it each poll) and its read of the guard's reason."""
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(FIVE_LINES_EXIT_3)
        job.write_file(job.paths.cost_deadline, "1800000000\nfirst\n")
        job.write_file(job.paths.cost_deadline, "1800000060\nsecond\n")
        assert job.read_file(job.paths.cost_deadline) == "1800000060\nsecond\n"
        assert stat.S_IMODE(Path(job.paths.cost_deadline).stat().st_mode) == 0o644
        assert not list(Path(job.paths.job_dir).glob("cost-deadline.upload-*")), "no temporary file left"
        assert job.read_file(str(remote_state_dir / "guard-reason")) is None
    finally:
        job.close()


def test_secrets_reach_the_job_but_no_process_list_or_script(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    secret = "tok-" + secrets.token_hex(16)
    job = _job(ssh_target, remote_state_dir)
    command = ["bash", "-c", 'echo "len=${#SECRET}"; sleep 1.5; echo done']
    try:
        job.start_or_attach(command, env={"SECRET": secret})
        _wait_until(lambda: "len=" in job.read_log())
        process_list = _remote(ssh_target, "ps -eo args")
        assert "sleep 1.5" in process_list  # captured while the job runs
        assert secret not in process_list
        assert secret not in Path(job.paths.script).read_text()
        assert not Path(job.paths.env_file).exists()
        assert list(Path(job.paths.job_dir).glob("*.upload-*")) == []
        assert job.stream(lambda _line: None, timeout_s=20) == 0
        assert job.read_log() == f"len={len(secret)}\ndone\n"
    finally:
        job.close()


def test_env_sh_workdir_and_clean_ssh_variables(ssh_target: SshTarget, remote_state_dir: Path, tmp_path: Path) -> None:
    env_sh = tmp_path / "env.sh"
    env_sh.write_text("export FROM_ENV_SH=yes\n")
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(
            ["bash", "-c", 'echo "$FROM_ENV_SH $(pwd) ${SSH_CONNECTION:-none}"'],
            workdir=str(tmp_path),
            env_sh=str(env_sh),
        )
        lines: list[str] = []
        assert job.stream(lines.append, timeout_s=20) == 0
        assert lines == [f"yes {tmp_path} none"]
    finally:
        job.close()


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_source_tree_is_uploaded_and_unpacked_before_the_command_runs(
    ssh_target: SshTarget, remote_state_dir: Path
) -> None:
    tree = _tar({"MLproject": b"name: p\n", "pkg/run.py": b"print('from the tree')\n"})
    job = _job(ssh_target, remote_state_dir)
    fetched: list[int] = []

    def source() -> bytes:
        fetched.append(1)
        return tree

    try:
        # The command runs with the tree as a plain folder: its path is the job's, known before it starts.
        command = ["bash", "-c", f"cat {job.paths.source_dir}/MLproject; python3 {job.paths.source_dir}/pkg/run.py"]
        assert job.start_or_attach(command, source=source) is True
        lines: list[str] = []
        assert job.stream(lines.append, timeout_s=20) == 0
        assert lines == ["name: p", "from the tree"]
        assert stat.S_IMODE(Path(job.paths.source_tar).stat().st_mode) == 0o600
        assert list(Path(job.paths.job_dir).glob("*.upload-*")) == []
        # Attaching fetches no tree: the download happens once per job, not once per task try.
        assert job.start_or_attach(command, source=source) is False
        assert fetched == [1]
    finally:
        job.close()


def test_a_source_tree_that_cannot_be_unpacked_fails_the_job_with_its_reason(
    ssh_target: SshTarget, remote_state_dir: Path
) -> None:
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(["echo", "never runs"], source=lambda: b"not a tar")
        assert job.stream(lambda _line: None, timeout_s=20) == 1
        log = job.read_log()
        assert "job: cannot unpack the source tree" in log and "never runs" not in log
    finally:
        job.close()


def test_reattach_after_a_drop_runs_the_job_once_and_replays_all_output(
    ssh_target: SshTarget, remote_state_dir: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    command = ["bash", "-c", f"echo run >> {shlex.quote(str(counter))}; {FIVE_LINES_EXIT_3[2]}"]
    first = _job(ssh_target, remote_state_dir, key=job_key("dag", "run-1"))
    assert first.start_or_attach(command) is True
    partial: list[str] = []
    with pytest.raises(RemoteJobTimeoutError, match="the job is still running"):
        first.stream(partial.append, timeout_s=0.5)
    first.close()  # the worker dies: its connection is gone, the job is not
    assert len(partial) < 5

    second = _job(ssh_target, remote_state_dir, key=job_key("dag", "run-1"))
    try:
        assert second.start_or_attach(command) is False
        lines: list[str] = []
        assert second.stream(lines.append, from_offset=0, timeout_s=20) == 3
        assert lines == [f"line {i}" for i in range(1, 6)]
        # Attaching to a finished job returns its exit code at once.
        assert second.start_or_attach(command) is False
        assert second.stream(lambda _line: None, timeout_s=5) == 3
    finally:
        second.close()
    assert counter.read_text() == "run\n"


def test_stream_reconnects_when_the_connection_drops(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    clients: list[Any] = []

    def tracked_connect() -> Any:
        client = connect(ssh_target, timeout_s=5)
        clients.append(client)
        return client

    job = RemoteJob(tracked_connect, job_dir_for(str(remote_state_dir), "drop"), poll_s=0.1, reconnect_backoff_s=0.05)
    try:
        job.start_or_attach(FIVE_LINES_EXIT_3)
        dropper = threading.Timer(0.4, lambda: clients[0].get_transport().close())
        dropper.start()
        lines: list[str] = []
        assert job.stream(lines.append, timeout_s=20) == 3
        dropper.join()
        assert lines == [f"line {i}" for i in range(1, 6)]
        assert len(clients) >= 2
    finally:
        job.close()


def _group_alive(ssh_target: SshTarget, pgid: str) -> bool:
    listing = _remote(ssh_target, "ps -e -o pgid=,stat=")
    return any(row.split()[0] == pgid and not row.split()[1].startswith("Z") for row in listing.splitlines())


def test_kill_stops_the_process_group_and_records_the_exit_code(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(["bash", "-c", "sleep 30 & sleep 30; wait"])
        _wait_until(lambda: Path(job.paths.pid).exists())
        pgid = Path(job.paths.pid).read_text().strip()
        _wait_until(lambda: _group_alive(ssh_target, pgid))
        job.kill(grace_s=5)
        assert not _group_alive(ssh_target, pgid)
        assert job.exit_code() == 143
        job.kill(grace_s=5)  # harmless again
        assert job.stream(lambda _line: None, timeout_s=5) == 143
    finally:
        job.close()


def test_a_shutdown_sigterm_is_recorded_by_the_job_itself(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    """An OS shutdown (EC2 terminate) SIGTERMs every process at once, with no kill() to record the code: the wrapper
    records 143 itself, so the job reads as stopped rather than lost."""
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(["bash", "-c", "echo started; sleep 30; echo carried-on"])
        _wait_until(lambda: Path(job.paths.pid).exists() and "started" in job.read_log())
        pgid = Path(job.paths.pid).read_text().strip()
        _remote(ssh_target, f"kill -TERM -- -{pgid}")
        assert job.stream(lambda _line: None, timeout_s=20) == 143
        assert "carried-on" not in job.read_log()
    finally:
        job.close()


def test_kill_escalates_to_sigkill_after_the_grace_period(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(["bash", "-c", "trap '' TERM; sleep 30"])
        _wait_until(lambda: Path(job.paths.pid).exists())
        started = time.monotonic()
        job.kill(grace_s=0.4)
        # Well before the job's own 30 s end, with room for a loaded machine: the SIGKILL, not the sleep, ended it.
        assert time.monotonic() - started < 20
        assert job.exit_code() == 137
        assert not _group_alive(ssh_target, Path(job.paths.pid).read_text().strip())
    finally:
        job.close()


def test_kill_right_after_start_and_before_any_job(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    never_started = _job(ssh_target, remote_state_dir, key="never")
    try:
        never_started.kill(grace_s=1)
        assert never_started.exit_code() is None
    finally:
        never_started.close()
    job = _job(ssh_target, remote_state_dir)
    try:
        job.start_or_attach(["sleep", "30"])
        job.kill(grace_s=2)
        assert job.exit_code() == 143
    finally:
        job.close()


def test_a_job_killed_without_an_exit_code_is_reported_lost(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    job = _job(ssh_target, remote_state_dir, lost_grace_s=0.3)
    try:
        job.start_or_attach(["bash", "-c", "echo started; sleep 30"])
        _wait_until(lambda: Path(job.paths.pid).exists() and "started" in job.read_log())
        _remote(ssh_target, f"kill -9 -- -{Path(job.paths.pid).read_text().strip()}")
        lines: list[str] = []
        with pytest.raises(RemoteJobLostError, match="no running process and no exit code"):
            job.stream(lines.append, timeout_s=20)
        assert lines == ["started"]
    finally:
        job.close()


def test_a_session_dropped_during_a_control_command_is_transient(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    """paramiko reports -1 when the channel closes without an exit status: a dropped connection the caller
    reconnects after, not a failed command (that failed a deferred training once, when a drop hit a liveness check)."""
    job = _job(ssh_target, remote_state_dir)
    try:
        # $PPID is the sshd process serving this session: killing it drops the connection mid-command.
        with pytest.raises(transient_ssh_errors()) as dropped:
            job._run("kill -9 $PPID; sleep 5")
        assert not isinstance(dropped.value, RemoteJobError)
        assert "closed before a control command" in str(dropped.value)
    finally:
        job.close()
