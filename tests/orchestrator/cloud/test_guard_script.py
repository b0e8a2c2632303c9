"""userdata/guard.sh as the unit runs it, against a temporary state folder: a fake job (its own process group, as
job.sh's setsid makes it), a `shutdown` stub and, for the GPU branch, a fake nvidia-smi on PATH. Short thresholds and
a one-second poll (the tests' variable) keep each under ten seconds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cloud.user_data import render_user_data
from tests.orchestrator.cloud.test_user_data import fake_bin, install, keys, make_spec
from tests.support.monitoring import wait_for

__all__ = ["keys"]  # the module-scoped fixture, shared


class Guarded:
    """A job folder with a running fake job, and the guard watching the state folder."""

    def __init__(self, state_dir: Path, tmp_path: Path, job: str, **spec: object) -> None:
        self.state_dir, self.shutdowns = state_dir, tmp_path / "shutdown.calls"
        self.job_dir = state_dir / "jobs" / "run-key"
        self.job_dir.mkdir(parents=True)
        self.files = install(render_user_data(make_spec(spec.pop("keys"), str(state_dir), **spec)))
        bin_dir = fake_bin(tmp_path, "shutdown", f'echo "$(date +%s) $*" >> {shlex.quote(str(self.shutdowns))}\n')
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "EC2_TRAINER_GUARD_POLL_S": "1",
            "EC2_TRAINER_GUARD_POWEROFF_GRACE_S": "1",
        }
        # As job.sh: the wrapper leads its own group and writes its pid, its output goes to output.log.
        self.job = subprocess.Popen(
            ["setsid", "bash", "-c", f"echo $$ > pid; exec >> output.log; {job}"], cwd=self.job_dir
        )
        while not (self.job_dir / "pid").exists():
            time.sleep(0.05)
        self.guard: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.guard = subprocess.Popen(["bash", str(self.files["guard.sh"])], env=self.env)

    def wait_reason(self, timeout_s: float) -> tuple[str, float]:
        reason = self.state_dir / "guard-reason"
        deadline = time.monotonic() + timeout_s
        while not reason.exists():
            assert time.monotonic() < deadline, f"no reason after {timeout_s} s: {self.log()}"
            time.sleep(0.1)
        return reason.read_text().strip(), time.time()

    def wait_shutdown(self) -> str:
        assert self.guard is not None
        assert self.guard.wait(timeout=20) == 0, self.log()
        return self.shutdowns.read_text()

    def log(self) -> str:
        path = self.state_dir / "guard.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for proc in (self.guard, self.job):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def guarded(tmp_path: Path, keys: object) -> Iterator[list[Guarded]]:
    made: list[Guarded] = []
    yield made
    for g in made:
        g.stop()


def make(guarded: list[Guarded], tmp_path: Path, keys: object, job: str, **spec: object) -> Guarded:
    g = Guarded(tmp_path / "state dir's", tmp_path, job, keys=keys, **spec)
    guarded.append(g)
    g.start()
    return g


def test_a_job_silent_for_stall_minutes_is_stopped_and_the_instance_powered_off(tmp_path, keys, guarded):
    # Prints for 4 s (not a stall), then hangs without a word.
    g = make(guarded, tmp_path, keys, "for i in 1 2 3 4; do echo step $i; sleep 1; done; sleep 300", stall_minutes=0.05)
    reason, _ = g.wait_reason(15)
    match = re.fullmatch(r"stalled: no log line or epoch for (\d+\.\d\d) min \(training\.stall_minutes\)", reason)
    assert match, reason
    # Not before 3 s of silence, within a poll of it.
    assert 0.05 <= float(match.group(1)) <= 0.1, reason
    assert g.job.wait(timeout=15) != 0, "the job's process group was stopped"
    assert g.wait_shutdown().split(" ", 1)[1].strip() == "-P now"
    assert "step 4" in (g.job_dir / "output.log").read_text()
    assert f"guard: {reason}" in (g.job_dir / "output.log").read_text(), "train streams it into the task log"
    assert (g.state_dir / "guard-reason").stat().st_mode & 0o777 == 0o644


def test_a_job_busy_printing_is_not_stopped(tmp_path, keys, guarded):
    g = make(guarded, tmp_path, keys, "while sleep 0.5; do echo tick; done", stall_minutes=0.05)
    time.sleep(6)
    assert not (g.state_dir / "guard-reason").exists(), g.log()
    assert g.job.poll() is None and not g.shutdowns.exists()
    assert "watching the job in" in g.log()


def test_idle_gpus_for_gpu_idle_minutes_stop_the_job(tmp_path, keys, guarded):
    # Two GPUs, both under 10 %.
    fake_bin(tmp_path, "nvidia-smi", 'printf "3\\n 7\\n"\n')
    g = make(guarded, tmp_path, keys, "sleep 300", min_gpu_utilization=10, gpu_idle_minutes=0.05)
    reason, _ = g.wait_reason(15)
    assert reason.startswith("GPU utilisation under 10% for 0.0"), reason
    assert "training.gpu_idle_minutes" in reason
    assert g.job.wait(timeout=15) != 0
    assert g.wait_shutdown()


def test_one_busy_gpu_keeps_the_job(tmp_path, keys, guarded):
    fake_bin(tmp_path, "nvidia-smi", 'printf "3\\n95\\n"\n')
    g = make(guarded, tmp_path, keys, "sleep 300", min_gpu_utilization=10, gpu_idle_minutes=0.05)
    time.sleep(5)
    assert not (g.state_dir / "guard-reason").exists(), g.log()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a real nvidia-smi is on PATH")
def test_without_a_gpu_the_gpu_guard_says_it_is_skipped_and_the_cost_deadline_holds(tmp_path, keys, guarded):
    g = Guarded(tmp_path / "state", tmp_path, "sleep 300", keys=keys, min_gpu_utilization=10, gpu_idle_minutes=0.05)
    guarded.append(g)
    deadline = int(time.time()) + 3
    cap = "cost cap: the run's cost would pass training.max_cost_usd = 0.01 USD"
    (g.job_dir / "cost-deadline").write_text(f"{deadline}\n{cap}\n")
    g.start()
    reason, at = g.wait_reason(15)
    assert reason == cap
    assert deadline <= at <= deadline + 1.5, "stopped at the deadline, within one poll"
    assert "no nvidia-smi on this instance: the GPU idle guard is skipped" in g.log()
    assert g.job.wait(timeout=15) != 0
    assert g.wait_shutdown()


def test_the_job_cannot_lift_the_cost_deadline_by_rewriting_or_removing_its_file(tmp_path, keys, guarded):
    g = Guarded(tmp_path / "state", tmp_path, "sleep 300", keys=keys)
    guarded.append(g)
    deadline = int(time.time()) + 4
    cap = "cost cap: the run's cost would pass training.max_cost_usd = 0.01 USD"
    (g.job_dir / "cost-deadline").write_text(f"{deadline}\n{cap}\n")
    g.start()
    wait_for("the guard to read the deadline", lambda: f"cost deadline {deadline} " in g.log(), 15)
    # The job owns its folder: a later deadline (left for one of the guard's 1 s polls), then no file at all.
    (g.job_dir / "cost-deadline").write_text(f"{deadline + 3600}\nlifted\n")
    time.sleep(1.5)
    (g.job_dir / "cost-deadline").unlink()
    reason, at = g.wait_reason(15)
    assert reason == cap
    assert deadline <= at <= deadline + 1.5, "stopped at the first deadline read"
    assert g.wait_shutdown()


def test_a_job_that_removes_its_cost_deadline_at_once_is_still_stopped_at_it(tmp_path, keys, guarded):
    """job.sh waits for the guard to hold the deadline before its command runs: a command that removes the file first
    thing (it owns the folder) is too late."""
    from orchestrator.instance.job_script import JobPaths, build_job_script

    g = Guarded(tmp_path / "state", tmp_path, "until [ -e job.sh ]; do sleep 0.1; done; exec bash job.sh", keys=keys)
    guarded.append(g)
    deadline = int(time.time()) + 8
    cap = "cost cap: the run's cost would pass training.max_cost_usd = 0.01 USD"
    (g.job_dir / "cost-deadline").write_text(f"{deadline}\n{cap}\n")
    command = ["bash", "-c", "rm cost-deadline && echo removed && sleep 300"]
    held = g.state_dir / "guard-cost-held"
    script = build_job_script(command, JobPaths(str(g.job_dir)), str(g.job_dir), None, guard_cost_held=str(held))
    (g.job_dir / "pid").unlink()
    (g.job_dir / "job.sh.tmp").write_text(script)
    (g.job_dir / "job.sh.tmp").rename(g.job_dir / "job.sh")
    # The guard only once job.sh runs (it wrote its pid) and had a second to go on: a job.sh that did not wait would
    # have removed the file by then.
    wait_for("job.sh to start", lambda: (g.job_dir / "pid").exists(), 15)
    time.sleep(1)
    g.start()
    wait_for("the job's command to run", lambda: "removed" in (g.job_dir / "output.log").read_text(), 20)
    assert held.read_text() == f"{g.job_dir}\n"
    assert held.stat().st_mode & 0o777 == 0o644
    reason, at = g.wait_reason(20)
    assert reason == cap
    assert deadline <= at <= deadline + 1.5, "stopped at the deadline the job removed"
    assert g.wait_shutdown()


def test_no_cost_deadline_names_no_job_as_held(tmp_path, keys, guarded):
    g = make(guarded, tmp_path, keys, "while sleep 0.5; do echo tick; done")
    wait_for("the guard to watch the job", lambda: "watching the job in" in g.log(), 15)
    time.sleep(2)
    assert not (g.state_dir / "guard-cost-held").exists()
