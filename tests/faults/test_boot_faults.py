"""Boot faults at unit level (a whole DAG run would wait at least a minute): an sshd that never answers, a
bootstrap that never writes its marker. Both waits must end at their deadline with a message that says what to do."""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from embedded.process import free_port
from orchestrator.instance.ssh import (
    BootstrapTimeoutError,
    SshTarget,
    SshTimeoutError,
    wait_for_bootstrap,
    wait_for_ssh,
)
from tests.support.fault_table import FaultTable
from tests.support.faults import record_nothing_launched
from tests.support.pipeline import ProcessListSampler
from tests.support.sshd import SshKeyPair

pytestmark = pytest.mark.slow


def key_lines(pair: SshKeyPair) -> dict[str, str]:
    """The private key's body lines: none may appear in a message, a log or the process list."""
    lines = [line for line in pair.private_pem.splitlines() if line and not line.startswith("-----")]
    return {f"key line {i}": line for i, line in enumerate(lines, 1)}


def timed_out(error: type[Exception], match: str, wait: Callable[[], object]) -> tuple[str, float]:
    """The message of the `error` that `wait` must raise (matching `match`), and the seconds it took to come."""
    started = time.monotonic()
    with pytest.raises(error, match=match) as raised:
        wait()
    elapsed = time.monotonic() - started
    return str(raised.value), elapsed


@pytest.fixture
def record_timeout(
    ssh_client_keypair: SshKeyPair,
    caplog: pytest.LogCaptureFixture,
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> Callable[[str, str, str, str], None]:
    """Records a timeout's row (message, scenario, expected, observed) once no line of the client's private key shows
    in its message, the log or the process list."""

    def record(message: str, scenario: str, expected: str, observed: str) -> None:
        places = {"message": message, "log": caplog.text, "process list": processes.text()}
        record_nothing_launched(
            fault_table, scenario, expected, observed, planted=key_lines(ssh_client_keypair), places=places
        )

    return record


def test_sshd_never_answering_times_out(
    ssh_host_keypair: SshKeyPair,
    ssh_client_keypair: SshKeyPair,
    record_timeout: Callable[[str, str, str, str], None],
) -> None:
    closed = SshTarget(
        host="127.0.0.1",
        port=free_port(),
        user=getpass.getuser(),
        host_public_key=ssh_host_keypair.public_line,
        private_key_pem=ssh_client_keypair.private_pem,
    )
    message, elapsed = timed_out(
        SshTimeoutError,
        r"did not accept a login within 2s",
        lambda: wait_for_ssh(closed, timeout_s=2, poll_s=0.2, connect_timeout_s=1),
    )
    assert "security group allows port" in message
    assert elapsed < 5, f"a 2 s wait took {elapsed:.1f} s"
    record_timeout(
        message,
        "unit: wait_for_ssh on a closed port, 2 s",
        "SshTimeoutError with a clear message",
        f"SshTimeoutError after {elapsed:.1f} s: 'did not accept a login ... check the security group'",
    )


def test_bootstrap_never_writing_its_marker_times_out(
    ssh_target: SshTarget,
    remote_state_dir: Path,
    record_timeout: Callable[[str, str, str, str], None],
) -> None:
    (remote_state_dir / "bootstrap.log").write_text("installing packages\n")
    message, elapsed = timed_out(
        BootstrapTimeoutError,
        r"wrote no marker .* within 2s",
        lambda: wait_for_bootstrap(ssh_target, str(remote_state_dir), timeout_s=2, poll_s=0.2),
    )
    assert "installing packages" in message, "the bootstrap log's tail belongs in the message"
    assert elapsed < 8, f"a 2 s wait took {elapsed:.1f} s"
    record_timeout(
        message,
        "unit: wait_for_bootstrap, no marker, 2 s",
        "BootstrapTimeoutError with the log tail",
        f"BootstrapTimeoutError after {elapsed:.1f} s, tail of bootstrap.log included",
    )
