"""Many training DAG runs at once on a real scheduler: what the load test asserts and the load benchmark prints.

While the batch runs, a sampler records the project's live instances (the cap must hold at every moment), the
memory of this process tree (Airflow components, task processes, services, emulated instances and their jobs), and
how long each task instance had a task process, i.e. held a worker slot (the LocalExecutor's `airflow worker -- <ti
id>` processes): `train` should hold one only to start the job and to finish, the triggerer following it between.
Afterwards each run is checked against the others: its own instance, its own host key, and on that instance's disk
its own training job and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from embedded.deploy.airflow_local import LocalAirflow
from embedded.deploy.stack import EmbeddedStack

DAG_ID = "ec2_training"
# How the LocalExecutor titles the process running one task instance: `airflow worker -- <ti id>`.
TASK_PROCESS_TITLE = "airflow worker -- "


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    state: str
    task_states: dict[str, str]
    task_seconds: dict[str, float]
    instance_id: str
    host_key: str
    mlflow_run_id: str
    # This run's training job key, and the job directories found on its instance: only its own, or runs mixed.
    own_job: str
    jobs_on_instance: tuple[str, ...]
    # Seconds a task process of `train` was alive (a worker slot held), against the train task's whole duration.
    train_worker_s: float = 0.0


@dataclass
class LoadReport:
    runs: list[RunOutcome]
    cap: int
    wall_s: float = 0.0
    max_live_instances: int = 0
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    instances_left: list[str] = field(default_factory=list)

    @property
    def states(self) -> Counter[str]:
        return Counter(run.state for run in self.runs)

    def shared(self) -> dict[str, list[str]]:
        """Anything two runs had in common (instance, host key, MLflow run): must be empty."""
        found: dict[str, list[str]] = {}
        for what in ("instance_id", "host_key", "mlflow_run_id"):
            values = Counter(getattr(run, what) for run in self.runs if getattr(run, what))
            if repeated := [value[:24] for value, n in values.items() if n > 1]:
                found[what] = repeated
        return found

    def foreign_jobs(self) -> dict[str, list[str]]:
        """Per run, the jobs on its instance that are not its own: must be empty."""
        return {
            run.run_id: others
            for run in self.runs
            if (others := [job for job in run.jobs_on_instance if job != run.own_job])
        }

    def problems(self) -> list[str]:
        """Every way the batch fell short: failed runs, instances left, the cap exceeded, runs mixed up."""
        found = [f"run {r.run_id} ended {r.state}: {r.task_states}" for r in self.runs if r.state != "success"]
        if self.instances_left:
            found.append(f"instances left running: {self.instances_left}")
        if self.max_live_instances > self.cap:
            found.append(f"{self.max_live_instances} instances were live at once, over the cap of {self.cap}")
        found += [f"runs shared a {what}: {values}" for what, values in self.shared().items()]
        found += [
            f"run {run} found other runs' jobs on its instance: {jobs}" for run, jobs in self.foreign_jobs().items()
        ]
        return found

    def mean_task_seconds(self) -> dict[str, float]:
        tasks = dict.fromkeys(task for run in self.runs for task in run.task_seconds)
        return {task: sum(r.task_seconds.get(task, 0.0) for r in self.runs) / len(self.runs) for task in tasks}

    def train_slot_seconds(self) -> tuple[float, float]:
        """(worker-slot seconds held by train, seconds train took), summed over the runs."""
        worker = sum(run.train_worker_s for run in self.runs)
        return worker, sum(run.task_seconds.get("train", 0.0) for run in self.runs)

    def render(self) -> str:
        per_task = ", ".join(f"{task} {seconds:.1f}" for task, seconds in self.mean_task_seconds().items())
        worker_s, train_s = self.train_slot_seconds()
        lines = [
            f"Load: {len(self.runs)} concurrent DAG runs, aws.max_instances = {self.cap}",
            f"  final states         {dict(self.states)}",
            f"  wall time            {self.wall_s:.1f} s (first trigger to last run finished)",
            f"  live instances, max  {self.max_live_instances} (cap {self.cap})",
            f"  instances left       {len(self.instances_left)}",
            f"  peak memory          {self.peak_pss_mb:.0f} MB PSS ({self.peak_rss_mb:.0f} MB summed RSS) "
            "for this process tree: Airflow, task processes, services, instances and their jobs",
            f"  task seconds, mean   {per_task}",
            f"  train worker slots   {worker_s:.0f} slot-seconds held by train's task processes over {train_s:.0f} s "
            f"of train tasks ({worker_s / train_s if train_s else 0:.0%})",
        ]
        return "\n".join(lines)


class Sampler:
    """Samples, every interval, the project's live instances (from EC2) and this process tree's memory."""

    def __init__(self, stack: EmbeddedStack, project_tag: str, interval_s: float = 0.5) -> None:
        self._ec2 = stack.cloud.client("ec2")
        self._project_tag = project_tag
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self.max_live = 0
        self.peak_rss = 0
        self.peak_pss = 0
        # Task instance id -> seconds a task process of it was seen alive.
        self.task_process_s: dict[str, float] = {}
        self._last_look = time.monotonic()

    def _live(self) -> int:
        pages = self._ec2.describe_instances(
            Filters=[
                {"Name": "tag:ec2-trainer:project", "Values": [self._project_tag]},
                {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
            ]
        )
        return sum(len(r["Instances"]) for r in pages["Reservations"])

    def _memory(self) -> tuple[int, int]:
        import psutil

        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return rss, pss

    def _count_task_processes(self) -> None:
        """Add the time since the last look to every task instance that has a task process now."""
        import psutil

        now = time.monotonic()
        elapsed, self._last_look = now - self._last_look, now
        running = set()
        for proc in psutil.Process().children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if TASK_PROCESS_TITLE in title:
                running.add(title.split(TASK_PROCESS_TITLE, 1)[1].split()[0])
        for ti_id in running:
            self.task_process_s[ti_id] = self.task_process_s.get(ti_id, 0.0) + elapsed

    def _run(self) -> None:
        next_memory = 0.0
        while not self._stop.wait(self._interval_s):
            self.max_live = max(self.max_live, self._live())
            self._count_task_processes()
            if time.monotonic() >= next_memory:  # reading every process's smaps is the costly part
                rss, pss = self._memory()
                self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
                next_memory = time.monotonic() + 2 * self._interval_s

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_batch(
    stack: EmbeddedStack,
    airflow: LocalAirflow,
    *,
    runs: int,
    cap: int,
    project_tag: str,
    conf: dict[str, Any],
    timeout_s: float,
    prefix: str = "load",
) -> LoadReport:
    """Trigger `runs` DAG runs at once, wait for all, and gather what each one did."""
    from orchestrator.contracts_steps import LaunchedInstance
    from orchestrator.instance.job_script import job_key

    airflow.wait_for_dag(DAG_ID)
    run_ids = [f"{prefix}__{n:02d}" for n in range(runs)]
    started = time.monotonic()
    with Sampler(stack, project_tag) as sampler:
        for run_id in run_ids:
            airflow.trigger(DAG_ID, run_id, conf)
        states = airflow.wait_for_runs(DAG_ID, run_ids, timeout_s=timeout_s)
    report = LoadReport(runs=[], cap=cap, wall_s=time.monotonic() - started)
    report.max_live_instances = sampler.max_live
    report.peak_rss_mb, report.peak_pss_mb = sampler.peak_rss / 2**20, sampler.peak_pss / 2**20

    for run_id in run_ids:
        tis = airflow.task_instances(DAG_ID, run_id)
        xcom = _xcom_or_none(airflow, run_id, LaunchedInstance.STEP)
        launched = LaunchedInstance.from_xcom(xcom) if xcom else None
        instance_id = launched.instance_id if launched else ""
        booted = stack.cloud.instances.get(instance_id)
        jobs_dir = stack.cloud.host_path(booted, stack.state_dir / "jobs") if booted else None
        report.runs.append(
            RunOutcome(
                run_id=run_id,
                state=states[run_id],
                task_states={task: str(ti["state"]) for task, ti in tis.items()},
                task_seconds={task: float(ti["duration"] or 0.0) for task, ti in tis.items()},
                instance_id=instance_id,
                host_key=launched.host_public_key if launched else "",
                mlflow_run_id=_xcom_or_none(airflow, run_id, "train") or "",
                own_job=job_key(DAG_ID, run_id),
                jobs_on_instance=tuple(sorted(p.name for p in jobs_dir.glob("*"))) if jobs_dir else (),
                train_worker_s=sampler.task_process_s.get(str(tis["train"]["id"]), 0.0) if "train" in tis else 0.0,
            )
        )
    ec2 = stack.cloud.client("ec2")
    ids = [run.instance_id for run in report.runs if run.instance_id]
    if ids:
        for reservation in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            report.instances_left += [
                i["InstanceId"] for i in reservation["Instances"] if i["State"]["Name"] != "terminated"
            ]
    return report


def _xcom_or_none(airflow: LocalAirflow, run_id: str, task_id: str) -> Any:
    from embedded.deploy.airflow_local import AirflowError

    try:
        return airflow.xcom(DAG_ID, run_id, task_id)
    except AirflowError:
        return None
