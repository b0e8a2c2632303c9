"""Helpers of the fault-injection suite: where secrets could leak, what a run left running, faults timed to a job.

The Airflow-deployment modules (tests/faults/test_scheduler_faults.py, tests/deploy/test_celery_deployment.py) share
`scan`, the leak scan of runs whose tasks ran in the deployment's own processes."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from embedded.cloud import EmulatedInstance
from embedded.deploy.airflow_local import LocalAirflow
from embedded.deploy.load import DAG_ID
from embedded.deploy.stack import EmbeddedStack
from orchestrator.cloud.user_data import readable_user_data
from tests.support.fault_table import FaultTable
from tests.support.leak_scan import SshTraffic, planted_found
from tests.support.pipeline import ProcessListSampler, instances_of, secrets_found

# Long enough for a cold `mlflow run` to reach its first epoch on a busy 2-core machine.
JOB_WAIT_S = 240.0


def instances_left(stack: EmbeddedStack, dag_run: Any) -> int:
    """How many of the run's instances are not terminated."""
    return sum(1 for i in instances_of(stack, dag_run).values() if i["State"]["Name"] != "terminated")


def record_run(
    table: FaultTable,
    scenario: str,
    expected: str,
    observed: str,
    *,
    stack: EmbeddedStack,
    dag_run: Any,
    planted: Mapping[str, str],
    log: str,
    processes: ProcessListSampler,
) -> None:
    """Prove the run leaked no planted secret and left no instance running, then record its row.

    What went over SSH comes from the recorder the suite installs for every test (tests/faults/conftest.py)."""
    found = secrets_found(planted, stack, dag_run, log, processes, SshTraffic.active())
    leaks = sum(found.values())
    left = instances_left(stack, dag_run)
    assert leaks == 0, f"{leaks} occurrence(s) of planted secrets found: {found}"
    assert left == 0, f"{left} instance(s) of the run are not terminated"
    table.record(scenario, expected, observed, left, leaks)


def record_nothing_launched(
    table: FaultTable,
    scenario: str,
    expected: str,
    observed: str,
    *,
    planted: Mapping[str, str],
    places: Mapping[str, str],
) -> None:
    """Record the row of a fault that launched no instance, once no planted secret shows in `places` (name -> text)."""
    found = planted_found(planted, places)
    leaks = sum(found.values())
    assert leaks == 0, f"{leaks} occurrence(s) of planted secrets found: {found}"
    table.record(scenario, expected, observed, 0, leaks)


@dataclass(frozen=True)
class DagRunFaults:
    """What a fault test of a training DAG run in this process (`dag.test()`) reads and records: the output the run
    logged, and the run's row once it leaked no planted secret and left no instance running (`record_run`)."""

    stack: EmbeddedStack
    planted: dict[str, str]
    processes: ProcessListSampler
    table: FaultTable
    capfd: pytest.CaptureFixture[str]
    caplog: pytest.LogCaptureFixture

    def log(self) -> str:
        """What the run logged: `output`."""
        return output(self.capfd, self.caplog)

    def record(self, dag_run: Any, log: str, scenario: str, expected: str, observed: str) -> None:
        record_run(
            self.table,
            scenario,
            expected,
            observed,
            stack=self.stack,
            dag_run=dag_run,
            planted=self.planted,
            log=log,
            processes=self.processes,
        )


def scan(
    planted: Mapping[str, str],
    stack: EmbeddedStack,
    airflow: LocalAirflow,
    runs: dict[str, str],
    processes: ProcessListSampler,
) -> dict[str, int]:
    """Planted secrets in the runs' task logs, XComs, rendered fields, instances' user-data, and the process list.

    `runs` maps each DAG run id to its instance id."""
    ec2 = stack.cloud.client("ec2")
    places = {"process list": processes.text()}
    for run_id, instance_id in runs.items():
        places[f"{run_id} task logs"] = airflow.task_log(DAG_ID, run_id)
        places[f"{run_id} XComs and rendered fields"] = airflow.stored_outputs(DAG_ID, run_id)
        attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        places[f"{run_id} user-data"] = readable_user_data(base64.b64decode(attr["UserData"]["Value"]).decode())
    return planted_found(planted, places)


def output(capfd: Any, caplog: Any) -> str:
    """What the run logged. Task loggers write through Airflow's structlog to stdout/stderr (caught by capfd only
    when Airflow set its logging up after capfd started); module loggers reach the root logger (caplog)."""
    captured = capfd.readouterr()
    return str(captured.out + captured.err + caplog.text)


class OnTraining:
    """Runs `action(job_dir)` once, in a thread, as soon as a job started after this object logs its first epoch:
    any job, or with `run_id` only that training run's (several runs at once each get their own fault)."""

    def __init__(self, stack: EmbeddedStack, action: Callable[[Path], Any], run_id: str | None = None) -> None:
        from orchestrator.instance.job_script import job_key

        self._stack = stack
        self._before = set(stack.job_dirs())
        self._action = action
        self._only = job_key(DAG_ID, run_id) if run_id else None
        self.job_dir: Path | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-on-training", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + JOB_WAIT_S
        while time.monotonic() < deadline:
            for log in (job / "output.log" for job in self._stack.job_dirs()):
                if log.parent in self._before or self._only not in (None, log.parent.name):
                    continue
                if log.exists() and "epoch" in log.read_text(errors="replace"):
                    self.job_dir = log.parent
                    try:
                        self.result = self._action(log.parent)
                    except BaseException as exc:  # handed to the test thread by __exit__
                        self.error = exc
                    return
            time.sleep(0.2)

    def __enter__(self) -> OnTraining:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        if self.job_dir is None:
            raise AssertionError("the fault was never injected: no new job logged an epoch")


def job_group(job_dir: Path) -> int:
    """The job's process-group id (the wrapper writes its pid, the group leader's, there)."""
    return int((job_dir / "pid").read_text().strip())


def _proc_stat(pid: int) -> tuple[int, int, int]:
    """(parent pid, process group, session) of a process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(_proc_stat(int(entry.name))[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def live_instance(stack: EmbeddedStack) -> EmulatedInstance:
    live = [i for i in stack.cloud.instances.values() if i.powered_off_at is None and i.sshd is not None]
    if len(live) != 1:
        raise AssertionError(f"expected one live emulated instance, found {[i.instance_id for i in live]}")
    return live[0]


def drop_ssh(stack: EmbeddedStack, job_dir: Path, down_s: float = 1.0) -> int:
    """Restart the instance's sshd and kill its established sessions; the detached job itself is left alone.

    Stopping the listener alone would not drop a connection (each session is its own process), so the sessions are
    killed too. Returns how many session processes were killed.
    """
    inst = live_instance(stack)
    assert inst.sshd is not None
    listener = int((inst.root / "sshd" / "sshd.pid").read_text().strip())
    group = job_group(job_dir)
    sessions = []
    for pid in _descendants(listener):
        with contextlib.suppress(OSError):
            if group not in _proc_stat(pid)[1:]:
                sessions.append(pid)
    inst.sshd.stop()
    for pid in sessions:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(down_s)
    inst.sshd.start()
    return len(sessions)


def kill_job(job_dir: Path) -> int:
    """SIGKILL the job's whole process group, wrapper included: it can record no exit code (like an OOM kill)."""
    group = job_group(job_dir)
    os.killpg(group, signal.SIGKILL)
    return group


def hang_job(job_dir: Path) -> float:
    """SIGSTOP the job's whole process group: it hangs, printing nothing, alive (as a deadlocked job). Returns when."""
    os.killpg(job_group(job_dir), signal.SIGSTOP)
    return time.time()


def hold_job(job_dir: Path) -> None:
    """Stop every process of the job (SIGSTOP): it neither advances nor ends until `released_after_reattach`.

    A retry that comes after the job ended reads the result from MLflow instead of re-attaching; holding the job
    while the killed try is retried keeps it running, so the test sees the re-attach it is about."""
    os.killpg(job_group(job_dir), signal.SIGSTOP)


def release_after_reattach(read_log: Callable[[], str], held: OnTraining, timeout_s: float = 600) -> None:
    """Resume a held job once the task log says a retry re-attached to it (failing after `timeout_s` otherwise);
    resumed whatever happened, so a failure never leaves the run hanging on a stopped job."""
    try:
        deadline = time.monotonic() + timeout_s
        while "Re-attached to the training job" not in read_log():
            if time.monotonic() > deadline:
                raise AssertionError(f"no retry re-attached to the held job within {timeout_s:.0f} s")
            time.sleep(0.5)
    finally:
        if held.job_dir is not None:
            os.killpg(job_group(held.job_dir), signal.SIGCONT)
