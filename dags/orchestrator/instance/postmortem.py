"""The post-mortem bundle: what to copy from an instance before its teardown, and copying it bounded and scrubbed.

A failure (a failed, lost or timed-out job, a failed bootstrap) gets the whole bundle; a success a small one (the
job's log tail, the bootstrap's phases, the GPU's state), so that a good run's record says what it ran on too.

A failed run's instance is terminated minutes later, taking the job's log, the bootstrap's and the kernel's with it.
`collect` reads the tail of each (files over SFTP, the rest through short commands the login user may run), scrubs
secrets and cuts each part and the whole to a bound; the caller attaches the parts to the MLflow run (`postmortem/`)
or, with no run yet, writes them to the task log. Collecting never raises: a missing bundle must not hide the error.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.redaction import scrub

if TYPE_CHECKING:
    import paramiko

    from orchestrator.config.settings import Settings
    from orchestrator.instance.ssh import SshTarget

log = logging.getLogger(__name__)

ARTIFACT_DIR = "postmortem"
# Per part and in all: enough for the last screens of a log, small enough for MLflow and a task log.
PART_MAX_BYTES = 64 * 1024
TOTAL_MAX_BYTES = 256 * 1024
SMALL_PART_MAX_BYTES = 16 * 1024
SMALL_TOTAL_MAX_BYTES = 48 * 1024
# The parts of a success's bundle: the rest (logs of a boot that worked, the kernel's) would only repeat them.
SMALL_PARTS = frozenset({"job-output.log", "bootstrap.phases", "nvidia-smi.txt"})
COMMAND_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 20.0
KERNEL_TAIL_LINES = 200
TRUNCATED = "[... cut to the last {kept} of {size} bytes ...]\n"
# The kernel log: journalctl needs the adm or systemd-journal group, dmesg may be restricted
# (kernel.dmesg_restrict); the first that answers wins, else the part says neither could be read.
KERNEL_COMMAND = (
    f"journalctl -k -n {KERNEL_TAIL_LINES} --no-pager 2>/dev/null || dmesg 2>/dev/null | tail -n {KERNEL_TAIL_LINES} "
    "|| echo 'kernel log not readable by this user (journalctl -k and dmesg refused): look for OOM kills in the "
    "instance console output'"
)
GPU_COMMAND = "if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -q 2>&1; else echo 'no nvidia-smi: no GPU'; fi"


@dataclass(frozen=True)
class Part:
    """One piece of the bundle: the tail of a remote file (`path`) or the output of a short `command`."""

    name: str  # artifact file name under postmortem/
    path: str = ""
    command: str = ""


def bundle_parts(state_dir: str, job_log: str | None = None) -> tuple[Part, ...]:
    """What to collect: the job's output (when a job ran), the bootstrap's log and phases, the guard's log,
    cloud-init's output, the kernel log tail and the GPU's state."""
    from orchestrator.instance.ssh import BOOTSTRAP_LOG, BOOTSTRAP_PHASES

    parts = [Part("job-output.log", path=job_log)] if job_log else []
    return (
        *parts,
        Part("bootstrap.log", path=posixpath.join(state_dir, BOOTSTRAP_LOG)),
        Part("bootstrap.phases", path=posixpath.join(state_dir, BOOTSTRAP_PHASES)),
        # What the guard watched and why it stopped the job (userdata/guard.sh).
        Part("guard.log", path=posixpath.join(state_dir, "guard.log")),
        Part("cloud-init-output.log", path="/var/log/cloud-init-output.log"),
        Part("kernel.log", command=KERNEL_COMMAND),
        Part("nvidia-smi.txt", command=GPU_COMMAND),
    )


def bounded(data: bytes, size: int, max_bytes: int) -> str:
    """The last `max_bytes` of a part (`size` bytes in all) as text, saying when it was cut."""
    if size <= max_bytes and len(data) <= max_bytes:
        return data.decode("utf-8", errors="replace")
    kept = data[-max_bytes:]
    return TRUNCATED.format(kept=len(kept), size=size) + kept.decode("utf-8", errors="replace")


def assemble(
    raw: Mapping[str, str],
    redact: Callable[[str], str] | None = None,
    total_max_bytes: int = TOTAL_MAX_BYTES,
) -> dict[str, str]:
    """Each part scrubbed (credentials' shapes, then `redact`, e.g. Airflow's secrets masker) and, in order, kept
    while the total stays within `total_max_bytes`; a part past it says so instead of its text."""
    bundle: dict[str, str] = {}
    used = 0
    for name, text in raw.items():
        clean = scrub(redact(text) if redact else text)
        size = len(clean.encode())
        if used + size > total_max_bytes:
            clean = f"[left out: the bundle's {total_max_bytes} bytes were used by the parts before it]\n"
            size = len(clean.encode())
        bundle[name] = clean
        used += size
    return bundle


def _read_part(client: paramiko.SSHClient, sftp: paramiko.SFTPClient, part: Part, max_bytes: int) -> str:
    from orchestrator.instance.ssh import read_from

    if part.path:
        try:
            size = sftp.stat(part.path).st_size or 0
        except FileNotFoundError:
            return f"[{part.path} does not exist on the instance]\n"
        except PermissionError:
            return f"[{part.path} is not readable by the login user]\n"
        try:
            return bounded(read_from(sftp, part.path, max(size - max_bytes, 0), max_bytes), size, max_bytes)
        except PermissionError:
            return f"[{part.path} is not readable by the login user]\n"
    _, stdout, _ = client.exec_command(part.command, timeout=COMMAND_TIMEOUT_S)
    # The commands bound their own output (a tail, one GPU report); this only caps a runaway, keeping its end.
    data = bytes(stdout.read(max_bytes * 4))
    return bounded(data, len(data), max_bytes)


def collect(
    target: SshTarget,
    parts: tuple[Part, ...],
    redact: Callable[[str], str] | None = None,
    *,
    part_max_bytes: int = PART_MAX_BYTES,
    total_max_bytes: int = TOTAL_MAX_BYTES,
) -> dict[str, str]:
    """The bundle read from the instance ({artifact name: text}); a part that could not be read says why, and an
    instance that cannot be reached gives an empty bundle. Never raises."""
    from orchestrator.instance.ssh import connect

    raw: dict[str, str] = {}
    try:
        client = connect(target, timeout_s=CONNECT_TIMEOUT_S)
    except Exception as exc:
        log.warning("Post-mortem bundle not collected: no SSH to %s (%s)", target, scrub(f"{type(exc).__name__}"))
        return {}
    try:
        sftp = client.open_sftp()
        try:
            for part in parts:
                try:
                    raw[part.name] = _read_part(client, sftp, part, part_max_bytes)
                except Exception as exc:
                    raw[part.name] = f"[not collected: {type(exc).__name__}: {scrub(str(exc))[:200]}]\n"
        finally:
            sftp.close()
    except Exception as exc:
        log.warning("Post-mortem bundle cut short: %s: %s", type(exc).__name__, scrub(str(exc))[:200])
    finally:
        client.close()
    return assemble(raw, redact, total_max_bytes)


def airflow_redact(text: str) -> str:
    """Airflow's secrets masker: every connection password and sensitive variable the task has read."""
    from airflow.sdk.log import redact

    return str(redact(text))


def for_run(
    s: Settings, address: str, host_public_key: str, job_log: str | None = None, *, small: bool = False
) -> dict[str, str]:
    """The bundle of this run's instance (the job's log among it when a job ran; `small`: a success's few parts,
    tighter bounds); empty, logged, on any error."""
    try:
        from orchestrator.instance.ready import ssh_target

        target = ssh_target(s, address, host_public_key)
        parts = bundle_parts(s.instance.state_dir, job_log)
        if small:
            parts = tuple(p for p in parts if p.name in SMALL_PARTS)
            return collect(
                target,
                parts,
                airflow_redact,
                part_max_bytes=SMALL_PART_MAX_BYTES,
                total_max_bytes=SMALL_TOTAL_MAX_BYTES,
            )
        return collect(target, parts, airflow_redact)
    except Exception as exc:
        log.warning("Post-mortem bundle not collected: %s: %s", type(exc).__name__, scrub(str(exc))[:200])
        return {}


def log_to_task_log(bundle: Mapping[str, str], logger: Any) -> None:
    """Every part in the task log (`logger`: the operator's), each line prefixed `postmortem | <part> |`."""
    for name, text in bundle.items():
        for line in text.splitlines():
            logger.info("postmortem | %s | %s", name, line)


def attach_to_run(tracking_uri: str, run_id: str, bundle: Mapping[str, str]) -> None:
    """Each part as a text artifact `postmortem/<name>` of the MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for name, text in bundle.items():
        client.log_text(run_id, text, posixpath.join(ARTIFACT_DIR, name))


def attach_or_log(s: Settings, mlflow_run_id: str | None, bundle: Mapping[str, str], logger: Any) -> str:
    """The bundle as the MLflow run's `postmortem/` artifacts, or into the task log (`logger`) without a run or
    when MLflow refuses it; what a failure message adds to say where the logs are ("" without a bundle)."""
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env

    if not bundle:
        return ""
    if mlflow_run_id:
        try:
            creds = mlflow_credentials(s.mlflow.conn_id)
            with credentials_in_env(creds.username, creds.password):
                attach_to_run(s.mlflow.tracking_uri, mlflow_run_id, bundle)
            return f"; the instance's logs are the run's '{ARTIFACT_DIR}/' artifacts"
        except Exception as exc:
            logger.warning("Could not attach the post-mortem bundle to MLflow run %s: %s", mlflow_run_id, exc)
    log_to_task_log(bundle, logger)
    return "; the instance's logs are in this task log, prefixed 'postmortem |'"
