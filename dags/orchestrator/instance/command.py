"""The `mlflow run` invocation the instance executes, and what its output tells us: pure functions."""

from __future__ import annotations

import hashlib
import json
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.ci.github_protocol import commit_checks_url, repository_url
from orchestrator.config.run_params import BY_NAME, DAG_PARAMS, JOB_PARAMS
from orchestrator.contracts import (
    DAG_ID_TAG,
    DAG_RUN_ID_TAG,
    JOB_KEY_TAG,
    PARENT_RUN_TAG,
    PREEMPTIONS_TAG,
    SETTINGS_DIGEST_TAG,
)
from orchestrator.tracking.runs import TrackedRun, run_name

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings
    from orchestrator.contracts_steps import LaunchPlan, ReadyInstance

# MLflow prints these lines on stderr (merged into the job log) when it creates and ends the run.
_RUN_STARTED_RE = re.compile(r"=== Running command .* in run with ID '([0-9a-f]{32})' ===")
_RUN_ENDED_RE = re.compile(r"=== Run \(ID '([0-9a-f]{32})'\) (succeeded|failed) ===")
# What MLproject's wrapper (remote/report_signal.sh) prints when a signal killed the training process.
_KILLED_BY_RE = re.compile(r"^=== training process killed by signal (\d+) ===$", re.MULTILINE)
# The kernel's OOM-killer lines ("Out of memory: Killed process 4242 (python) ...", or a cgroup's "Memory cgroup out
# of memory: Killed process ..."); the most telling one names the process it killed.
_OOM_RE = re.compile(r"^.*(?:out of memory|oom-kill).*$", re.MULTILINE | re.IGNORECASE)


def settings_digest(settings: Settings) -> str:
    """sha256 of the resolved settings as canonical JSON (sorted keys, no spaces): equal digests, equal settings.
    The settings hold no secret (credentials live in Airflow connections)."""
    canonical = json.dumps(settings.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def tracked_run(
    settings: Settings,
    ready: ReadyInstance,
    git_sha: str,
    *,
    lead: str,
    dag_id: str,
    run_id: str,
    try_number: int,
    dataset_tags: Mapping[str, str] | None = None,
    parent_run_id: str = "",
    image: LaunchPlan | None = None,
    preemptions: int = 0,
) -> TrackedRun:
    """Name and tags that lead from the MLflow run to the Airflow run, the instance, the commit and its CI checks.

    `lead` begins its name, what tells it apart (tracking.runs.training_run_lead); the short commit ends it.
    `ready` is wait_ready's result (instance id, type and market). The `mlflow.source.*` tags are MLflow's own, so
    its UI shows the commit and the repository as for a run `mlflow run` had created itself from git (the instance
    runs a shipped copy of the tree, which carries no git metadata of its own). `dataset_tags`: the
    identity of s3:// data (datasets.versions.DatasetVersion.tags). `parent_run_id` (a sweep's run) nests it from its
    creation, so a run that fails to train is still listed under its sweep. `image`: plan_launch's result, whose
    AMI id and name (`ec2.ami_id`, `ec2.ami_name`) let the run be repeated on the same image. `preemptions`: the
    spot interruptions wait_ready already recovered from (PREEMPTIONS_TAG, which train's own recoveries raise).
    """
    from orchestrator.instance.job_script import job_key

    parent = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
    ami = {"ec2.ami_id": image.ami_id, "ec2.ami_name": image.ami_name or "unknown"} if image else {}
    preempted = {PREEMPTIONS_TAG: str(preemptions)} if preemptions else {}
    return TrackedRun(
        name=run_name(lead, git_sha),
        tags={
            DAG_ID_TAG: dag_id,
            DAG_RUN_ID_TAG: run_id,
            JOB_KEY_TAG: job_key(dag_id, run_id),
            "airflow.try_number": str(try_number),
            "ec2.instance_id": ready.instance_id,
            "ec2.instance_type": ready.instance_type,
            "ec2.market": ready.market,
            "ci.url": commit_checks_url(settings.github.api_url, settings.github.repo, git_sha),
            "mlflow.source.git.commit": git_sha,
            "mlflow.source.git.repoURL": repository_url(settings.github.api_url, settings.github.repo),
            "mlflow.source.name": repository_url(settings.github.api_url, settings.github.repo),
            "mlflow.source.type": "PROJECT",
            "mlflow.project.entryPoint": settings.training.entry_point,
            SETTINGS_DIGEST_TAG: settings_digest(settings),
            **(dataset_tags or {}),
            **ami,
            **parent,
            **preempted,
        },
    )


@dataclass(frozen=True)
class TrainingCommand:
    # The commit's tree as shipped to the instance (remote_job's source folder): a plain folder, no git.
    project_dir: str
    entry_point: str
    experiment: str
    params: Mapping[str, str] = field(default_factory=dict)
    # The run created beforehand (tracking.start_training_run). Given it, `mlflow run` logs no params of its own:
    # it would log them shell-quoted ('synthetic://?...', ''), and the job logs them as it parsed them instead.
    mlflow_run_id: str | None = None

    def argv(self) -> list[str]:
        """`mlflow run` on the commit's shipped tree, in the instance's own environment (the bootstrap prepared it).
        No --version: the folder is that commit (MLflow accepts one only for a git URI)."""
        args = [
            "mlflow",
            "run",
            self.project_dir,
            "--entry-point",
            self.entry_point,
            "--env-manager",
            "local",
            "--experiment-name",
            self.experiment,
        ]
        if self.mlflow_run_id:
            args += ["--run-id", self.mlflow_run_id]
        for key in sorted(self.params):
            args += ["-P", f"{key}={self.params[key]}"]
        return args


def training_command(
    settings: Settings, git_sha: str, project_dir: str, mlflow_run_id: str | None = None
) -> TrainingCommand:
    t = settings.training
    uri = settings.checkpoint_uri  # holds no secret: settings refuse credentials in it
    # Without checkpoints neither is passed: the job's defaults are off, and a commit from before checkpoints, whose
    # job refuses arguments it does not know, still trains.
    checkpoints = {"checkpoint_uri": uri, "checkpoint_minutes": repr(settings.checkpoints.minutes)} if uri else {}
    params = {
        **{key: value for key, value in t.extra_params.items() if key not in DAG_PARAMS},
        **{name: _job_param(settings, name) for name in JOB_PARAMS},
        **checkpoints,
        "git_sha": git_sha,
    }
    return TrainingCommand(
        project_dir=project_dir,
        entry_point=t.entry_point,
        experiment=settings.mlflow.experiment,
        params=params,
        mlflow_run_id=mlflow_run_id,
    )


def _job_param(settings: Settings, name: str) -> str:
    """The knob's setting as the job's command line spells it; repr keeps every digit of a float."""
    section, key = BY_NAME[name].setting.split(".")
    value = getattr(getattr(settings, section), key)
    return repr(value) if isinstance(value, float) else str(value)


def parse_mlflow_run_id(log_text: str) -> str | None:
    """The id of the run `mlflow run` created, from its own announcement in the job log."""
    match = _RUN_STARTED_RE.search(log_text) or _RUN_ENDED_RE.search(log_text)
    return match.group(1) if match else None


def exit_description(exit_code: int, log_text: str, kernel_log: str = "") -> str:
    """How the job ended, in words: its exit code, and the signal that killed the training process when the job's
    wrapper reported one; for SIGKILL "out of memory?" with the kernel's OOM line when `kernel_log` holds one."""
    text = f"exited with code {exit_code}"
    killed = _KILLED_BY_RE.findall(log_text)
    if not killed:
        return text
    number = int(killed[-1])
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    text += f": the training process was killed by {name} ({number})"
    if number != signal.SIGKILL:
        return text
    oom = _OOM_RE.findall(kernel_log)
    named = [line for line in oom if "Killed process" in line] or oom
    return text + (
        f", out of memory? The kernel logged: {named[-1].strip()[:300]}"
        if named
        else ", out of memory? (no OOM line in the kernel log the instance let us read)"
    )
