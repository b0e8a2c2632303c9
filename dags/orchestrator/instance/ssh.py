"""SSH to the training instance with a pinned host key, wait for it to answer, and wait for its bootstrap marker.

paramiko is used directly rather than the SSH provider's SSHHook: SSHHook pins a host key only through connection
extras and otherwise accepts whatever key answers first, while here the expected key comes from the launch step (it was
generated for this instance and given to it in user-data), and anything else must be refused before authenticating.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import tenacity

from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    import paramiko

logger = logging.getLogger(__name__)

# Seconds between SSH keepalives: keeps NAT/firewall state alive during long, quiet log polls.
KEEPALIVE_S = 15
# How often the SSH wait repeats an unchanged "not ready yet" line.
PROGRESS_LOG_EVERY_S = 30.0
# SSH that answered and then fails this long during the bootstrap: ask EC2 whether the instance is still there (a
# restarting sshd is back within seconds; a spot instance taken back never is).
UNREACHABLE_AFTER_S = 30.0
BOOTSTRAP_STATUS = "bootstrap.status"
BOOTSTRAP_LOG = "bootstrap.log"
# "<step> <seconds>" lines, one per finished bootstrap step (userdata/bootstrap.sh), complete before the marker.
BOOTSTRAP_PHASES = "bootstrap.phases"
LOG_TAIL_LINES = 40
# Only the end of a log is read for a tail, so a huge log costs one bounded read.
TAIL_READ_BYTES = 64 * 1024
READ_CHUNK_BYTES = 1024 * 1024
# paramiko logs each SFTP session's start and end at INFO ("[chan 0] Opened sftp connection (server version 3)",
# "[chan 0] sftp session closed."): every poll of a wait opens one, and the wait's task log was full of them. Its
# warnings and errors still show.
SFTP_LOGGER = "paramiko.transport.sftp"


class WaitLog(Protocol):
    """What the waits log through: this module's logger in a worker, a trigger's `self.log` in the triggerer."""

    def info(self, event: str, /, *args: Any) -> Any: ...
    def warning(self, event: str, /, *args: Any) -> Any: ...


class HostKeyMismatchError(OrchestratorError):
    """The server presented a host key other than the pinned one; nothing was sent to it."""


class SshTimeoutError(OrchestratorError):
    """SSH did not answer (or did not accept our key) within the allowed time."""

    # The wait's deadline counts from the launch: a retry would time out at once.
    terminal = True


class BootstrapFailedError(OrchestratorError):
    """The instance's bootstrap wrote an error marker."""

    # The marker stays: a retry reads the same error.
    terminal = True


class BootstrapTimeoutError(OrchestratorError):
    """The instance's bootstrap wrote no marker in time."""

    # The wait's deadline counts from the launch: a retry would time out at once.
    terminal = True


class InstanceUnreachableError(OrchestratorError):
    """SSH answered, then stopped answering for UNREACHABLE_AFTER_S during the bootstrap: the instance may be gone
    (EC2 took its spot capacity back) or restarting sshd. The caller asks EC2, then waits again from `log_offset`."""

    def __init__(self, message: str, log_offset: int) -> None:
        super().__init__(message)
        self.log_offset = log_offset


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in: the host key is pinned, the private key never shows in a repr."""

    host: str
    port: int
    user: str
    host_public_key: str  # OpenSSH public key line, e.g. "ssh-ed25519 AAAA... [comment]"
    private_key_pem: str = field(repr=False)

    @property
    def host_key_name(self) -> str:
        """The known_hosts name OpenSSH and paramiko look the host up by."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class BootstrapResult:
    ok: bool
    status_line: str
    log_tail: str
    elapsed_s: float
    phases_s: dict[str, float] = field(default_factory=dict)


def parse_phases(text: str | None) -> dict[str, float]:
    """bootstrap.phases as {step: seconds}; a malformed line (the instance writes it) is skipped, not trusted."""
    phases: dict[str, float] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isidentifier() and parts[1].isdigit():
            phases[parts[0]] = phases.get(parts[0], 0.0) + float(parts[1])
    return phases


def parse_public_key(line: str) -> paramiko.PKey:
    """An OpenSSH public key line as a paramiko key; raises OrchestratorError naming the expected format."""
    import paramiko

    parts = line.split()
    if len(parts) < 2:
        raise OrchestratorError(
            "The pinned host key must be an OpenSSH public key line like 'ssh-ed25519 AAAA...'; "
            f"got {len(parts)} field(s). Pass the instance's public host key generated at launch."
        )
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1], validate=True))
    except (ValueError, paramiko.SSHException) as exc:
        raise OrchestratorError(
            f"The pinned host key of type {parts[0]!r} could not be parsed ({type(exc).__name__}); "
            "pass an OpenSSH public key line like 'ssh-ed25519 AAAA...'."
        ) from exc


def load_private_key(pem: str) -> paramiko.PKey:
    """A private key (OpenSSH or PEM format, unencrypted) as a paramiko key."""
    import paramiko

    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(pem))
        except (paramiko.SSHException, ValueError):
            continue
    # The key text itself is never put in the message.
    raise OrchestratorError(
        "The SSH private key could not be loaded as an unencrypted Ed25519, ECDSA or RSA key; "
        "check the key given to the SSH target (OpenSSH or PEM format, no passphrase)."
    )


def transient_ssh_errors() -> tuple[type[BaseException], ...]:
    """Errors after which a reconnect may help: refused, reset, timed out, banner or transport failures."""
    import paramiko

    return (paramiko.SSHException, EOFError, OSError)


def connect(target: SshTarget, *, timeout_s: float = 30.0) -> paramiko.SSHClient:
    """Log in with strict host key checking against the pinned key only (no agent, no ~/.ssh keys or known_hosts).

    Raises HostKeyMismatchError before authenticating when the server's key differs: no command can run then.
    """
    import paramiko

    logging.getLogger(SFTP_LOGGER).setLevel(logging.WARNING)
    expected = parse_public_key(target.host_public_key)
    client = paramiko.SSHClient()
    # Only the pinned key is known; RejectPolicy refuses any host without it.
    client.get_host_keys().add(target.host_key_name, expected.get_name(), expected)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=load_private_key(target.private_key_pem),
            timeout=timeout_s,
            banner_timeout=timeout_s,
            auth_timeout=timeout_s,
            channel_timeout=timeout_s,
            allow_agent=False,
            look_for_keys=False,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyMismatchError(
            f"Host key of {target.host}:{target.port} does not match the pinned key: expected "
            f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}, received "
            f"{exc.key.get_name()} {exc.key.fingerprint}: possible man-in-the-middle or a reused IP; "
            "not connecting. Check that the address belongs to the instance launched for this run."
        ) from None
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(KEEPALIVE_S)
    return client


def wait_for_ssh(target: SshTarget, *, timeout_s: float, poll_s: float = 5.0, connect_timeout_s: float = 10.0) -> None:
    """ssh_answers in a worker: log in until it works or `timeout_s` passes; a host key mismatch fails at once."""
    now = time.time()
    answered = ssh_answers(
        target, started_at=now, deadline=now + timeout_s, poll_s=poll_s, connect_timeout_s=connect_timeout_s
    )
    asyncio.run(answered).close()


async def ssh_answers(
    target: SshTarget,
    *,
    started_at: float,
    deadline: float,
    poll_s: float,
    connect_timeout_s: float,
    log: WaitLog = logger,
) -> paramiko.SSHClient:
    """The SSH wait of both paths, wait_for_ssh's and BootstrapTrigger's: log in until it works, returning the client;
    SshTimeoutError at `deadline` (epoch seconds; the message counts from `started_at`), a host key mismatch at once.
    Logins run in a thread, pauses are asyncio sleeps: a triggerer's event loop never blocks. Authentication failures
    are retried too: while cloud-init is still writing the authorized key, a booting instance may refuse our key.
    """
    logged_error, logged_at = "", -PROGRESS_LOG_EVERY_S

    def log_refusal(state: tenacity.RetryCallState) -> None:
        nonlocal logged_error, logged_at
        error = describe(failed_with(state))
        # A booting instance refuses for minutes: say so when it changes or every so often, not every poll.
        if error != logged_error or time.monotonic() - logged_at >= PROGRESS_LOG_EVERY_S:
            log.info("SSH to %s not ready yet (attempt %d): %s", target, state.attempt_number, error)
            logged_error, logged_at = error, time.monotonic()

    def time_out(state: tenacity.RetryCallState) -> NoReturn:
        budget_s = deadline - started_at
        raise SshTimeoutError(ssh_timeout_message(target, budget_s, state.attempt_number, describe(failed_with(state))))

    async def log_in() -> paramiko.SSHClient:
        return await asyncio.to_thread(connect, target, timeout_s=_bounded(connect_timeout_s, deadline))

    login = tenacity.AsyncRetrying(
        # HostKeyMismatchError is not among them: it fails the first attempt.
        retry=tenacity.retry_if_exception_type(transient_ssh_errors()),
        # Gives up rather than sleep past the deadline.
        stop=tenacity.stop_before_delay(max(deadline - time.time(), 0.0)),
        wait=tenacity.wait_fixed(poll_s),
        after=log_refusal,
        retry_error_callback=time_out,
    )
    client: paramiko.SSHClient = await login(log_in)
    log.info("SSH to %s answered with the pinned host key after %.1fs", target, time.time() - started_at)
    return client


def _bounded(connect_timeout_s: float, deadline: float) -> float:
    """One login's timeout: never past the wait's deadline, yet at least a second."""
    return min(connect_timeout_s, max(deadline - time.time(), 1.0))


def failed_with(state: tenacity.RetryCallState) -> BaseException:
    """The error of the attempt a tenacity hook is called after: `after`, `before_sleep` and the give-up callback
    are called after failed attempts only, so the outcome holds one."""
    return cast("BaseException", cast("tenacity.Future", state.outcome).exception())


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def ssh_timeout_message(target: SshTarget, timeout_s: float, attempts: int, last_error: str) -> str:
    return (
        f"SSH to {target} did not accept a login within {timeout_s:.0f}s ({attempts} attempts; last "
        f"error: {last_error}). Check that the security group allows port {target.port} from this "
        "worker, that the instance is running, and its console output for boot errors."
    )


class LineBuffer:
    """Splits a byte stream into complete text lines, keeping a trailing partial line until more bytes arrive."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *complete, self._pending = (self._pending + data).split(b"\n")
        return [_decode_line(line) for line in complete]

    @property
    def pending_bytes(self) -> int:
        """Bytes of the partial last line held back: a reader resuming elsewhere starts that many bytes earlier."""
        return len(self._pending)

    def flush(self) -> list[str]:
        """The last line when the stream ended without a newline."""
        pending, self._pending = self._pending, b""
        return [_decode_line(pending)] if pending else []


def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


def read_from(sftp: paramiko.SFTPClient, path: str, offset: int, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
    """Bytes of a remote file from `offset` (at most `max_bytes`); empty when the file does not exist yet."""
    try:
        with sftp.open(path, "rb") as handle:
            handle.seek(offset)
            return bytes(handle.read(max_bytes))
    except FileNotFoundError:
        return b""


def read_text(sftp: paramiko.SFTPClient, path: str) -> str | None:
    """A small remote file's text, or None when it does not exist."""
    try:
        with sftp.open(path, "rb") as handle:
            return bytes(handle.read()).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def read_tail(sftp: paramiko.SFTPClient, path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a remote file (read from its last 64 KiB only); empty when it does not exist."""
    try:
        size = sftp.stat(path).st_size or 0
    except FileNotFoundError:
        return ""
    data = read_from(sftp, path, max(size - TAIL_READ_BYTES, 0), TAIL_READ_BYTES)
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


class BootstrapWatch:
    """One look at a time at `<state_dir>/bootstrap.status` and the new lines of `<state_dir>/bootstrap.log`:
    what bootstrap_marker polls, in a worker or the triggerer."""

    def __init__(self, state_dir: str, log_offset: int = 0) -> None:
        self.status_path = posixpath.join(state_dir, BOOTSTRAP_STATUS)
        self.log_path = posixpath.join(state_dir, BOOTSTRAP_LOG)
        self.phases_path = posixpath.join(state_dir, BOOTSTRAP_PHASES)
        # Read with the final marker (the bootstrap writes them first): each step's seconds, for the run report.
        self.phases_s: dict[str, float] = {}
        self._lines = LineBuffer()
        # Where an earlier wait stopped streaming the log (a wait resumed after the instance was unreachable).
        self.log_offset = log_offset
        self._ready: list[str] = []

    def poll(self, client: paramiko.SSHClient, *, with_tail: bool = False) -> tuple[str, str]:
        """(status, tail): status is `ok` or `error: ...` once the bootstrap wrote its marker, else empty; the
        log's tail comes with a final status, or when asked (for a timeout message). Blocking and short."""
        sftp = client.open_sftp()
        try:
            status = (read_text(sftp, self.status_path) or "").strip()
            while chunk := read_from(sftp, self.log_path, self.log_offset):
                self.log_offset += len(chunk)
                self._ready += self._lines.feed(chunk)
            final = status == "ok" or status.startswith("error")
            tail = read_tail(sftp, self.log_path) if final or with_tail else ""
            if final:
                self.phases_s = parse_phases(read_text(sftp, self.phases_path))
        finally:
            sftp.close()
        return (status if final else ""), tail

    def take_lines(self) -> list[str]:
        taken, self._ready = self._ready, []
        return taken

    def timeout_message(self, target: SshTarget, timeout_s: float, tail: str) -> str:
        return (
            f"Bootstrap on {target} wrote no marker to {self.status_path} within {timeout_s:.0f}s. "
            "Raise the bootstrap timeout if the image is slow to prepare, or read the instance's "
            f"console output. Last lines of {self.log_path}:\n{tail}"
        )


def wait_for_bootstrap(
    target: SshTarget,
    state_dir: str,
    *,
    timeout_s: float,
    poll_s: float = 5.0,
    on_log: Callable[[str], None] | None = None,
    connect_timeout_s: float = 30.0,
    log_offset: int = 0,
) -> BootstrapResult:
    """bootstrap_marker in a worker: `<state_dir>/bootstrap.status` says `ok` (returned) or `error: ...` (raised)."""
    now = time.time()
    waited = bootstrap_marker(
        target,
        state_dir,
        started_at=now,
        deadline=now + timeout_s,
        poll_s=poll_s,
        on_log=on_log or (lambda _line: None),
        connect_timeout_s=connect_timeout_s,
        log_offset=log_offset,
    )
    return asyncio.run(waited)


async def bootstrap_marker(
    target: SshTarget,
    state_dir: str,
    *,
    started_at: float,
    deadline: float,
    poll_s: float,
    on_log: Callable[[str], None],
    connect_timeout_s: float,
    client: paramiko.SSHClient | None = None,
    log: WaitLog = logger,
    log_offset: int = 0,
) -> BootstrapResult:
    """The bootstrap wait of both paths, wait_for_bootstrap's and BootstrapTrigger's: poll the marker over `client`
    (or a new login, also after a drop), the log's new lines (from `log_offset`) to `on_log`, until it is final or
    `deadline` (epoch seconds) passes: BootstrapFailedError, BootstrapTimeoutError (with the log's tail);
    InstanceUnreachableError once SSH has failed for UNREACHABLE_AFTER_S. Polls run in a thread."""
    watch = BootstrapWatch(state_dir, log_offset)
    lost_since: float | None = None
    try:
        while True:
            late = time.time() + poll_s > deadline
            try:
                if client is None:
                    client = await asyncio.to_thread(connect, target, timeout_s=_bounded(connect_timeout_s, deadline))
                status, tail = await asyncio.to_thread(watch.poll, client, with_tail=late)
                lost_since = None
            except transient_ssh_errors() as exc:
                log.warning("Lost SSH to %s while waiting for bootstrap (%s); reconnecting", target, exc)
                if client is not None:
                    client.close()
                client = None
                lost_since = lost_since or time.time()
                if time.time() - lost_since >= UNREACHABLE_AFTER_S:
                    raise InstanceUnreachableError(
                        f"SSH to {target} has failed for {time.time() - lost_since:.0f} s during the bootstrap ({exc})",
                        watch.log_offset,
                    ) from exc
                status, tail = "", "(log not readable: the last poll lost its SSH connection)"
            finally:
                for line in watch.take_lines():
                    on_log(line)
            if status:
                return bootstrap_outcome(target, status, tail, time.time() - started_at, watch.phases_s)
            if late:
                raise BootstrapTimeoutError(watch.timeout_message(target, deadline - started_at, tail))
            await asyncio.sleep(poll_s)
    finally:
        if client is not None:
            client.close()


def bootstrap_outcome(
    target: SshTarget, status: str, tail: str, elapsed_s: float, phases_s: dict[str, float] | None = None
) -> BootstrapResult:
    """The result of a final status: `ok` returns, `error: ...` raises BootstrapFailedError with the log's tail."""
    if status == "ok":
        logger.info("Bootstrap on %s finished ok after %.1fs", target, elapsed_s)
        return BootstrapResult(
            ok=True, status_line=status, log_tail=tail, elapsed_s=elapsed_s, phases_s=dict(phases_s or {})
        )
    raise BootstrapFailedError(
        f"Bootstrap on {target} failed: {status}. Fix that step in the user-data bootstrap (or the image) and "
        f"launch again. Last lines of the bootstrap log:\n{tail}"
    )
