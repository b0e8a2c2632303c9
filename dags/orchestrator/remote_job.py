"""The training command as a detached remote job: started once per DAG run, re-attachable, streamable, killable.

Layout on the instance, one directory per job key (stable across task retries of the same DAG run):
    <state_dir>/jobs/<job_key>/  job.sh, job.env (secrets, deleted by the job as soon as it has read them),
                                 output.log, pid (the job's process-group id), exit_code, started.lock/
The job runs under `setsid nohup`, so it survives SSH drops and worker restarts; `exit_code` is written atomically
after the command ends and is the only trusted sign of completion.

Compared with the SSH provider's SSHRemoteJobOperator: environment values never enter the job script or any command
line (they travel in a 0600 file over SFTP), and the job directory depends on the DAG run only, so a task retry
re-attaches to the running job instead of starting a second training.

The shell builders are pure functions (tested without SSH); RemoteJob does the I/O.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.ssh import LineBuffer, read_from, read_text, transient_ssh_errors

if TYPE_CHECKING:
    import paramiko

# What paramiko's recv_exit_status() returns when the channel closed without an exit status.
NO_EXIT_STATUS = -1

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SLUG_CHARS = 48
# 64 bits of the run's identity: the slug is cut, so two runs sharing a long prefix differ only here.
_DIGEST_CHARS = 16
# Signal exit codes (128 + signal) recorded when kill() had to stop a job that could not write its own.
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
# How long kill() waits for a job that was just started to write its pid file.
PID_WAIT_S = 5
# Reconnects after a dropped SSH connection before following the job gives up (a retry re-attaches), and the first
# pause between them, doubled after each failure up to 32 times itself.
MAX_RECONNECTS = 10
RECONNECT_BACKOFF_S = 2.0
# Seconds between process checks while the log is quiet: each costs a remote shell, and is only a hint.
LIVENESS_CHECK_S = 5.0


class RemoteJobError(OrchestratorError):
    """The remote job could not be started, followed or stopped."""


class RemoteJobLostError(RemoteJobError):
    """The job's processes are gone but it left no exit code (killed -9, OOM-killed, or the instance rebooted)."""


class RemoteJobTimeoutError(RemoteJobError):
    """Streaming stopped at its time limit; the job itself may still be running."""


@dataclass(frozen=True)
class JobPaths:
    """The files of one remote job (POSIX paths on the instance)."""

    job_dir: str

    @property
    def script(self) -> str:
        return posixpath.join(self.job_dir, "job.sh")

    @property
    def env_file(self) -> str:
        return posixpath.join(self.job_dir, "job.env")

    @property
    def log(self) -> str:
        return posixpath.join(self.job_dir, "output.log")

    @property
    def pid(self) -> str:
        return posixpath.join(self.job_dir, "pid")

    @property
    def exit_code(self) -> str:
        return posixpath.join(self.job_dir, "exit_code")

    @property
    def started(self) -> str:
        """A directory: `mkdir` is atomic, so only the first starter creates it."""
        return posixpath.join(self.job_dir, "started.lock")

    def upload(self, path: str, suffix: str) -> str:
        """A per-caller temporary name for an upload, renamed into place only by the caller that starts the job."""
        return f"{path}.upload-{suffix}"


def job_key(dag_id: str, run_id: str) -> str:
    """A file-name-safe key for one DAG run: the same for every try of its tasks, different across runs."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:_DIGEST_CHARS]
    slug = _UNSAFE.sub("-", f"{dag_id}--{run_id}").strip("-.")[:_SLUG_CHARS].strip("-.")
    return f"{slug}-{digest}" if slug else digest


def job_dir_for(state_dir: str, key: str) -> JobPaths:
    if not key or _UNSAFE.search(key) or key.startswith("."):
        raise ConfigError(f"Job key {key!r} must be made of letters, digits, '.', '_' and '-'; use job_key().")
    return JobPaths(posixpath.join(state_dir, "jobs", key))


def build_env_file(env: Mapping[str, str]) -> str:
    """`KEY='value'` lines for `set -a; . file`; names are validated, values shell-quoted (never interpreted)."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"Environment variable name {name!r} for the remote job is invalid: use letters, digits and "
                "underscores, not starting with a digit."
            )
        if "\0" in value:
            # The message names the variable only, never its value.
            raise ConfigError(f"Environment variable {name} for the remote job contains a NUL byte; remove it.")
        lines.append(f"{name}={shlex.quote(value)}")
    return "".join(f"{line}\n" for line in lines)


def build_job_script(command: list[str], paths: JobPaths, workdir: str | None, env_sh: str | None) -> str:
    """The bash wrapper that runs `command` with its output appended to the log and records its exit code."""
    if not command:
        raise ConfigError("The remote job's command is empty; give the program and its arguments as a list.")
    q = shlex.quote
    exit_tmp = q(paths.exit_code + ".tmp")
    record = f'echo "$rc" > {exit_tmp} && mv -f {exit_tmp} {q(paths.exit_code)}'
    lines = [
        "#!/usr/bin/env bash",
        "# Written by the ec2-trainer orchestrator; started once per DAG run under setsid.",
        "set -uo pipefail",
        # Debian bash re-sources ~/.bashrc for anything it believes sshd started; with these gone it does not.
        "unset SSH_CLIENT SSH2_CLIENT SSH_CONNECTION",
        # The wrapper leads its own process group: its pid is the group id kill() signals.
        f"echo $$ > {q(paths.pid + '.tmp')} && mv -f {q(paths.pid + '.tmp')} {q(paths.pid)}",
    ]
    if env_sh:
        lines.append(f"if [ -f {q(env_sh)} ]; then . {q(env_sh)}; fi")
    env_file = q(paths.env_file)
    # Secrets arrive in a 0600 file, never in argv; it is removed as soon as it has been read.
    lines.append(f"if [ -f {env_file} ]; then set -a; . {env_file}; set +a; rm -f {env_file}; fi")
    if workdir:
        # Quoted as a whole: a workdir holding a quote must not end the message's quoting and run as a command.
        message = q(f"job: cannot cd to {workdir}")
        lines.append(f"cd {q(workdir)} || {{ echo {message} >> {q(paths.log)}; rc=1; {record}; exit 1; }}")
    lines += [
        f"{shlex.join(command)} >> {q(paths.log)} 2>&1 < /dev/null",
        "rc=$?",
        record,
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def build_start_command(paths: JobPaths, upload_suffix: str) -> str:
    """Start the job unless it was ever started for this key; prints `started` or `attached`.

    The caller uploaded the script (and maybe the env file) under per-caller temporary names; only the caller that
    wins the atomic `mkdir` of the lock moves them into place and starts the job, the others delete theirs.
    """
    q = shlex.quote
    script_tmp = q(paths.upload(paths.script, upload_suffix))
    env_tmp = q(paths.upload(paths.env_file, upload_suffix))
    launch = (
        "env -u SSH_CLIENT -u SSH2_CLIENT -u SSH_CONNECTION "
        f"nohup setsid bash {q(paths.script)} > /dev/null 2>&1 < /dev/null &"
    )
    return (
        f"if mkdir {q(paths.started)} 2>/dev/null; then "
        f"mv -f {script_tmp} {q(paths.script)} && "
        f"{{ [ ! -e {env_tmp} ] || mv -f {env_tmp} {q(paths.env_file)}; }} && "
        f"{{ {launch} }} && echo started; "
        f"else rm -f {script_tmp} {env_tmp}; echo attached; fi"
    )


def _alive_test(pgid_var: str) -> str:
    """A shell test, true while a non-zombie process of the group exists (zombies would fool `kill -0`)."""
    return f"ps -e -o pgid=,stat= | awk -v g=\"${pgid_var}\" '$1 == g && $2 !~ /^Z/ {{f = 1}} END {{exit !f}}'"


def build_alive_command(paths: JobPaths) -> str:
    """Prints `alive`, `gone`, or `unknown` (no pid file yet) for the job's process group."""
    return (
        f"pg=$(cat {shlex.quote(paths.pid)} 2>/dev/null) || {{ echo unknown; exit 0; }}; "
        f"if {_alive_test('pg')}; then echo alive; else echo gone; fi"
    )


def build_kill_command(paths: JobPaths, grace_s: float) -> str:
    """SIGTERM the job's process group, SIGKILL it after `grace_s`, and record an exit code if the job could not.

    Harmless to repeat: a finished or already killed job is left as it is.
    """
    q = shlex.quote
    grace_ticks = max(int(grace_s * 5), 1)
    exit_tmp = q(paths.exit_code + ".tmp")
    alive = _alive_test("pg")
    return "\n".join(
        [
            f"pidfile={q(paths.pid)}",
            # A job started a moment ago may not have written its pid yet.
            f'for _ in $(seq {PID_WAIT_S * 10}); do [ -s "$pidfile" ] && break; '
            f"[ -d {q(paths.started)} ] || break; sleep 0.1; done",
            'pg=$(cat "$pidfile" 2>/dev/null) || { echo "no job"; exit 0; }',
            "sig=",
            f"if {alive}; then",
            '  kill -TERM -- "-$pg" 2>/dev/null; sig=' + str(EXIT_SIGTERM),
            f"  for _ in $(seq {grace_ticks}); do {alive} || break; sleep 0.2; done",
            f'  if {alive}; then kill -KILL -- "-$pg" 2>/dev/null; sig={EXIT_SIGKILL}; fi',
            "fi",
            f'if [ -n "$sig" ] && [ ! -e {q(paths.exit_code)} ]; then',
            f'  echo "$sig" > {exit_tmp} && mv -f {exit_tmp} {q(paths.exit_code)}',
            "fi",
            'echo "killed ${sig:-none}"',
        ]
    )


def parse_exit_code(text: str | None) -> int | None:
    """The recorded exit code, or None while the file is absent (it is written atomically, so never partial)."""
    if text is None or not text.strip():
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise RemoteJobError(
            f"The remote job's exit_code file holds {text.strip()[:40]!r}, not a number; inspect the job directory."
        ) from None


def reconnect_delay_s(failures: int, backoff_s: float = RECONNECT_BACKOFF_S) -> float:
    """The pause before reconnect number `failures` (1 for the first): exponential, capped at 32 x backoff_s."""
    return float(backoff_s * 2 ** min(failures - 1, 5))


def timeout_message(paths: JobPaths, timeout_s: float, offset: int) -> str:
    return (
        f"Stopped following remote job {paths.job_dir} after {timeout_s:.0f}s (at log byte {offset}); the job is "
        "still running. Re-attach to follow it, or kill it."
    )


@dataclass
class JobCursor:
    """One follower's place in a job: log bytes read, the partial last line held back, lines read but not yet
    handed on (a poll that fails halfway keeps them for the next), and when the job's processes looked gone."""

    offset: int = 0
    next_liveness_check: float = 0.0
    lines: LineBuffer = field(default_factory=LineBuffer)
    ready: list[str] = field(default_factory=list)
    gone_since: float | None = None

    @property
    def resume_offset(self) -> int:
        """Where another follower resumes without losing or repeating a line: the end of the last whole line."""
        return self.offset - self.lines.pending_bytes

    def take_lines(self) -> list[str]:
        taken, self.ready = self.ready, []
        return taken


class RemoteJob:
    """One remote job, reached through `connect` (called again after a dropped connection)."""

    def __init__(
        self,
        connect: Callable[[], paramiko.SSHClient],
        paths: JobPaths,
        *,
        poll_s: float = 1.0,
        max_reconnects: int = MAX_RECONNECTS,
        reconnect_backoff_s: float = RECONNECT_BACKOFF_S,
        lost_grace_s: float = 30.0,
        on_disconnect: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._connect = connect
        # Called on every lost connection before reconnecting; it raises to stop (e.g. the instance is gone).
        self._on_disconnect = on_disconnect
        self.paths = paths
        self._poll_s = poll_s
        self._max_reconnects = max_reconnects
        self._reconnect_backoff_s = reconnect_backoff_s
        self._lost_grace_s = lost_grace_s
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def _liveness_every_s(self) -> float:
        return min(LIVENESS_CHECK_S, self._lost_grace_s)

    def __repr__(self) -> str:
        return f"RemoteJob(job_dir={self.paths.job_dir!r})"

    def start_or_attach(
        self,
        command: list[str],
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        env_sh: str | None = None,
    ) -> bool:
        """Start the job, or attach to the one already started for this key: True when this call started it.

        The env file is uploaded with mode 0600 inside a 0700 directory before the script is written or started.
        A finished job (exit_code present) is attached to as well; `stream` then returns its exit code at once.
        """
        script = build_job_script(command, self.paths, workdir, env_sh)
        env_text = build_env_file(env or {})
        self._run(f"mkdir -p {shlex.quote(self.paths.job_dir)} && chmod 700 {shlex.quote(self.paths.job_dir)}")
        sftp = self._open_sftp()
        if _exists(sftp, self.paths.started):
            logger.info("Remote job %s was already started: attaching", self.paths.job_dir)
            return False
        suffix = secrets.token_hex(6)
        if env_text:
            self._upload(sftp, self.paths.upload(self.paths.env_file, suffix), env_text, 0o600)
        self._upload(sftp, self.paths.upload(self.paths.script, suffix), script, 0o700)
        outcome = self._run(build_start_command(self.paths, suffix)).strip()
        if outcome not in ("started", "attached"):
            raise RemoteJobError(
                f"Starting the remote job in {self.paths.job_dir} printed {outcome[-300:]!r} instead of "
                "'started' or 'attached'; check that bash, nohup and setsid exist on the instance and the disk is "
                "not full."
            )
        started = outcome == "started"
        logger.info(
            "Remote job %s %s (env vars: %s)",
            self.paths.job_dir,
            "started" if started else "was already started: attaching",
            ", ".join(sorted(env or {})) or "none",
        )
        return started

    def cursor(self, from_offset: int = 0) -> JobCursor:
        """A fresh place to follow the job's log from (0 replays it all, e.g. into a retried task's log)."""
        return JobCursor(offset=from_offset, next_liveness_check=time.monotonic() + self._liveness_every_s)

    def poll(self, cursor: JobCursor) -> int | None:
        """One look: new log lines go to `cursor` (take them with `take_lines`); the exit code once there is one.

        Blocking and short (a few SFTP reads, now and then a process check): a trigger runs it in a thread. Raises
        RemoteJobLostError when the job's processes stayed gone past `lost_grace_s` with no exit code, and the
        transient SSH errors of `transient_ssh_errors()` (the caller reconnects; the cursor keeps its place).
        """
        sftp = self._open_sftp()
        # Exit code first, then the log to its end: once the code exists, the log is complete.
        exit_code = parse_exit_code(read_text(sftp, self.paths.exit_code))
        while chunk := read_from(sftp, self.paths.log, cursor.offset):
            cursor.offset += len(chunk)
            cursor.ready += cursor.lines.feed(chunk)
        if exit_code is not None:
            cursor.ready += cursor.lines.flush()
            logger.info("Remote job %s exited with %d", self.paths.job_dir, exit_code)
            return exit_code
        if time.monotonic() >= cursor.next_liveness_check:
            cursor.gone_since = self._check_alive(cursor.gone_since)
            cursor.next_liveness_check = time.monotonic() + self._liveness_every_s
        return None

    def stream(self, on_line: Callable[[str], None], *, from_offset: int = 0, timeout_s: float | None = None) -> int:
        """Pass each log line to `on_line` as it appears and return the job's exit code once it has one.

        The log is followed by byte offset, so after a dropped connection it resumes where it stopped while the
        job keeps running. Start at offset 0 after a re-attach (a task retry) to replay the whole output into the
        new try's log. Raises RemoteJobLostError when the job's processes are gone for `lost_grace_s` with no
        exit code, RemoteJobTimeoutError at `timeout_s` (the job keeps running), RemoteJobError when the
        connection cannot be re-established.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cursor = self.cursor(from_offset)
        failures = 0
        while True:
            exit_code = None
            try:
                exit_code = self.poll(cursor)
                failures = 0
            except transient_ssh_errors() as exc:
                failures += 1
                self._reconnect_after(exc, failures)
                continue
            finally:
                # Lines read before a failure are handed on too: the cursor has moved past them.
                for line in cursor.take_lines():
                    on_line(line)
            if exit_code is not None:
                return exit_code
            if deadline is not None and time.monotonic() + self._poll_s > deadline:
                raise RemoteJobTimeoutError(timeout_message(self.paths, timeout_s or 0, cursor.offset))
            time.sleep(self._poll_s)

    def read_log(self) -> str:
        """The job's whole log so far (e.g. to find the MLflow run id)."""
        return self._with_retries(lambda sftp: _read_all(sftp, self.paths.log))

    def exit_code(self) -> int | None:
        """The recorded exit code, or None while the job has none."""
        return self._with_retries(lambda sftp: parse_exit_code(read_text(sftp, self.paths.exit_code)))

    def kill(self, grace_s: float = 10.0) -> None:
        """SIGTERM the job's process group, SIGKILL after `grace_s`; records 143/137 if the job wrote no code."""
        outcome = self._run(build_kill_command(self.paths, grace_s), timeout_s=grace_s + PID_WAIT_S + 30)
        logger.info("Kill of remote job %s: %s", self.paths.job_dir, outcome.strip())

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._client is not None:
            self._client.close()
        self._sftp = None
        self._client = None

    def _check_alive(self, gone_since: float | None) -> float | None:
        """When the processes first looked gone; raises once they stayed gone past the grace period."""
        # "unknown" (no pid file) counts as gone too: a job that never wrote its pid never really started.
        if self._run(build_alive_command(self.paths)).strip() == "alive":
            return None
        now = time.monotonic()
        if gone_since is None:
            logger.warning("Remote job %s has no running process yet no exit code; waiting", self.paths.job_dir)
            return now
        if now - gone_since < self._lost_grace_s:
            return gone_since
        # The exit-code file is the truth: look once more before declaring the job lost.
        if parse_exit_code(read_text(self._open_sftp(), self.paths.exit_code)) is not None:
            return None
        raise RemoteJobLostError(
            f"Remote job {self.paths.job_dir} has no running process and no exit code after "
            f"{self._lost_grace_s:.0f}s: it was killed (e.g. -9 or out of memory) or the instance rebooted. "
            f"Read {self.paths.log} on the instance for its last lines."
        )

    def _reconnect_after(self, exc: BaseException, failures: int) -> None:
        self.close()
        if self._on_disconnect is not None:
            self._on_disconnect(exc)
        if failures > self._max_reconnects:
            raise RemoteJobError(
                f"Lost SSH to the instance of remote job {self.paths.job_dir} and could not reconnect after "
                f"{self._max_reconnects} attempts (last error: {type(exc).__name__}: {exc}). The job may still "
                "be running: re-attach later, or check the instance and its security group."
            ) from exc
        delay = reconnect_delay_s(failures, self._reconnect_backoff_s)
        logger.warning(
            "SSH to remote job %s failed (%s: %s); reconnecting in %.1fs (attempt %d of %d)",
            self.paths.job_dir,
            type(exc).__name__,
            exc,
            delay,
            failures,
            self._max_reconnects,
        )
        time.sleep(delay)

    def _with_retries(self, action: Callable[[paramiko.SFTPClient], _T]) -> _T:
        failures = 0
        while True:
            try:
                return action(self._open_sftp())
            except transient_ssh_errors() as exc:
                failures += 1
                self._reconnect_after(exc, failures)

    def _client_or_connect(self) -> paramiko.SSHClient:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _open_sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client_or_connect().open_sftp()
        return self._sftp

    def _run(self, command: str, timeout_s: float = 60.0) -> str:
        """Run a short shell command; returns stdout, raises RemoteJobError on a non-zero exit."""
        _, stdout, stderr = self._client_or_connect().exec_command(command, timeout=timeout_s)
        out = stdout.read().decode("utf-8", errors="replace")
        status = stdout.channel.recv_exit_status()
        if status == NO_EXIT_STATUS:
            import paramiko

            # The session ended before the command reported how it exited: the connection dropped (a transient
            # error, reconnected by the caller), not a command that failed.
            raise paramiko.SSHException(
                f"the SSH session closed before a control command for remote job {self.paths.job_dir} reported "
                "its exit status"
            )
        if status != 0:
            err = stderr.read().decode("utf-8", errors="replace")
            raise RemoteJobError(
                f"A control command for remote job {self.paths.job_dir} exited with {status}: {err.strip()[-500:]}"
                " Check the instance's disk and that the state directory is writable by the SSH user."
            )
        return out

    @staticmethod
    def _upload(sftp: paramiko.SFTPClient, path: str, text: str, mode: int) -> None:
        with sftp.open(path, "wb") as handle:
            # Restricted before any byte is written (the directory is 0700 as well).
            handle.chmod(mode)
            handle.write(text.encode())


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        return False
    return True


def _read_all(sftp: paramiko.SFTPClient, path: str) -> str:
    return read_text(sftp, path) or ""
