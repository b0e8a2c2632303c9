"""The training command as a detached remote job: started once per DAG run, re-attachable, streamable, killable.

The job's files and the shell that drives it are built in instance.job_script (pure); RemoteJob does the I/O.

Compared with the SSH provider's SSHRemoteJobOperator: environment values never enter the job script or any command
line (they travel in a 0600 file over SFTP), and the job directory depends on the DAG run only, so a task retry
re-attaches to the running job instead of starting a second training.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import tenacity

from orchestrator.errors import OrchestratorError
from orchestrator.instance.job_script import (
    PID_WAIT_S,
    JobPaths,
    build_alive_command,
    build_env_file,
    build_job_script,
    build_kill_command,
    build_start_command,
)
from orchestrator.instance.ssh import (
    LineBuffer,
    describe,
    failed_with,
    read_from,
    read_text,
    transient_ssh_errors,
)

if TYPE_CHECKING:
    import paramiko

# What paramiko's recv_exit_status() returns when the channel closed without an exit status.
NO_EXIT_STATUS = -1

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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
        source: Callable[[], bytes] | None = None,
        cost_deadline: tuple[str, str] | None = None,
    ) -> bool:
        """Start the job, or attach to the one already started for this key: True when this call started it.

        The env file is uploaded with mode 0600 inside a 0700 directory before the script is written or started.
        `source` makes the tar the job unpacks into `paths.source_dir` first; it is called (and uploaded over SFTP)
        only when this call may start the job, not when it attaches.
        `cost_deadline`: the cost-deadline file's text and the guard's file naming the job whose deadline it holds;
        the file is in place before the job starts, and the job waits for the guard to hold it (build_job_script).
        A finished job (exit_code present) is attached to as well; `stream` then returns its exit code at once.
        """
        script = build_job_script(
            command,
            self.paths,
            workdir,
            env_sh,
            source=source is not None,
            guard_cost_held=cost_deadline[1] if cost_deadline else None,
        )
        env_text = build_env_file(env or {})
        self._run(f"mkdir -p {shlex.quote(self.paths.job_dir)} && chmod 700 {shlex.quote(self.paths.job_dir)}")
        sftp = self._open_sftp()
        if _exists(sftp, self.paths.started):
            logger.info("Remote job %s was already started: attaching", self.paths.job_dir)
            return False
        suffix = secrets.token_hex(6)
        if source is not None:
            tree = source()
            self._upload(sftp, self.paths.upload(self.paths.source_tar, suffix), tree, 0o600)
            logger.info("Uploaded the source tree (%d bytes) into %s", len(tree), self.paths.job_dir)
        if env_text:
            self._upload(sftp, self.paths.upload(self.paths.env_file, suffix), env_text, 0o600)
        if cost_deadline:
            self._upload(sftp, self.paths.upload(self.paths.cost_deadline, suffix), cost_deadline[0], 0o644)
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

        Blocking and short (a few SFTP reads, now and then a process check): `follow` runs it in a thread. Raises
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
        """Pass each log line to `on_line` as it appears and return the job's exit code once it has one: `follow`,
        in this worker, reconnecting after a dropped connection.

        The log is followed by byte offset, so after a dropped connection it resumes where it stopped while the
        job keeps running. Start at offset 0 after a re-attach (a task retry) to replay the whole output into the
        new try's log. Raises RemoteJobLostError when the job's processes are gone for `lost_grace_s` with no
        exit code, RemoteJobTimeoutError at `timeout_s` (the job keeps running), RemoteJobError when the
        connection cannot be re-established.
        """
        deadline = math.inf if timeout_s is None else time.time() + timeout_s
        followed = self.follow(self.cursor(from_offset), on_line, deadline=deadline, timeout_s=timeout_s or 0)
        return asyncio.run(followed)

    async def follow(
        self,
        cursor: JobCursor,
        on_line: Callable[[str], None],
        *,
        deadline: float,
        timeout_s: float,
        reconnect: bool = True,
    ) -> int:
        """The wait on a job, of both paths (`stream` and RemoteJobTrigger): poll until the job has an exit code,
        each poll in a thread and each pause an asyncio sleep, so a triggerer's event loop never blocks.

        RemoteJobTimeoutError once `deadline` (epoch seconds) would pass, its message naming `timeout_s`. Without
        `reconnect` a dropped connection raises its transient error: the trigger hands it to the operator, which
        asks EC2 about the instance before following again.
        """

        async def poll_and_hand_on() -> int | None:
            try:
                return await asyncio.to_thread(self._dropping_on_loss, lambda: self.poll(cursor))
            finally:
                # Lines read before a failure are handed on too, from the event loop's thread (a trigger logs there).
                for line in cursor.take_lines():
                    on_line(line)

        while True:
            exit_code: int | None
            if reconnect:
                # Each poll has the whole reconnect budget: a connection that came back resets the count.
                exit_code = await tenacity.AsyncRetrying(**self._reconnect_policy())(poll_and_hand_on)
            else:
                exit_code = await poll_and_hand_on()
            if exit_code is not None:
                return exit_code
            if time.time() + self._poll_s > deadline:
                raise RemoteJobTimeoutError(timeout_message(self.paths, timeout_s, cursor.offset))
            await asyncio.sleep(self._poll_s)

    def read_log(self) -> str:
        """The job's whole log so far (e.g. to find the MLflow run id)."""
        return self._reconnecting(lambda: _read_all(self._open_sftp(), self.paths.log))

    def read_file(self, path: str) -> str | None:
        """Another file on the instance (e.g. the guard's reason), None when it does not exist."""
        return self._reconnecting(lambda: read_text(self._open_sftp(), path))

    def write_file(self, path: str, text: str) -> None:
        """A small file replaced whole (written beside it, then renamed): a reader never sees half of it."""

        def attempt() -> None:
            sftp = self._open_sftp()
            tmp = self.paths.upload(path, secrets.token_hex(6))
            self._upload(sftp, tmp, text, 0o644)
            sftp.posix_rename(tmp, path)

        self._reconnecting(attempt)

    def exit_code(self) -> int | None:
        """The recorded exit code, or None while the job has none."""
        return self._reconnecting(lambda: parse_exit_code(read_text(self._open_sftp(), self.paths.exit_code)))

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

    def _reconnecting(self, attempt: Callable[[], _T]) -> _T:
        """`attempt()`, tried again on a new connection after a lost one (`_reconnect_policy`)."""
        return tenacity.Retrying(**self._reconnect_policy())(self._dropping_on_loss, attempt)

    def _reconnect_policy(self) -> dict[str, Any]:
        """At most `max_reconnects` reconnects, `reconnect_delay_s` apart (the delays the deferred path counts across
        its triggers too): one policy for a worker's blocking calls and its `follow`."""
        return {
            "retry": tenacity.retry_if_exception_type(transient_ssh_errors()),
            "stop": tenacity.stop_after_attempt(self._max_reconnects + 1),
            "wait": lambda state: reconnect_delay_s(state.attempt_number, self._reconnect_backoff_s),
            "before_sleep": self._log_reconnect,
            "retry_error_callback": self._give_up,
        }

    def _dropping_on_loss(self, attempt: Callable[[], _T]) -> _T:
        try:
            return attempt()
        except transient_ssh_errors() as exc:
            # Closed and reported on every loss, the last one too, before any decision to reconnect.
            self.close()
            if self._on_disconnect is not None:
                self._on_disconnect(exc)
            raise

    def _log_reconnect(self, state: tenacity.RetryCallState) -> None:
        logger.warning(
            "SSH to remote job %s failed (%s); reconnecting in %.1fs (attempt %d of %d)",
            self.paths.job_dir,
            describe(failed_with(state)),
            state.upcoming_sleep,
            state.attempt_number,
            self._max_reconnects,
        )

    def _give_up(self, state: tenacity.RetryCallState) -> NoReturn:
        exc = failed_with(state)
        raise RemoteJobError(
            f"Lost SSH to the instance of remote job {self.paths.job_dir} and could not reconnect after "
            f"{self._max_reconnects} attempts (last error: {describe(exc)}). The job may still "
            "be running: re-attach later, or check the instance and its security group."
        ) from exc

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
    def _upload(sftp: paramiko.SFTPClient, path: str, data: str | bytes, mode: int) -> None:
        with sftp.open(path, "wb") as handle:
            # Restricted before any byte is written (the directory is 0700 as well).
            handle.chmod(mode)
            # Pipelined: a source tree of megabytes would otherwise wait for each 32 KiB write's acknowledgement.
            handle.set_pipelined(True)
            handle.write(data.encode() if isinstance(data, str) else data)


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        return False
    return True


def _read_all(sftp: paramiko.SFTPClient, path: str) -> str:
    return read_text(sftp, path) or ""
