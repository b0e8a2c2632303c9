"""The `mlflow run` invocation the instance executes, and what its output tells us: pure functions."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.github import commit_checks_url
from orchestrator.run_params import BY_NAME, JOB_PARAMS

if TYPE_CHECKING:
    from orchestrator.settings import Settings

# MLflow prints these lines on stderr (merged into the job log) when it creates and ends the run.
_RUN_STARTED_RE = re.compile(r"=== Running command .* in run with ID '([0-9a-f]{32})' ===")
_RUN_ENDED_RE = re.compile(r"=== Run \(ID '([0-9a-f]{32})'\) (succeeded|failed) ===")

# The -P params the DAG sets: the trigger form's job knobs (from their settings) and the commit the CI gate resolved.
# training.extra_params may add others, never replace these (settings refuses them): a run's recorded params must
# say what it really trained.
DAG_PARAMS = frozenset((*JOB_PARAMS, "git_sha"))


DAG_ID_TAG = "airflow.dag_id"
DAG_RUN_ID_TAG = "airflow.run_id"
# The remote job's key (remote_job.job_key: letters, digits, '._-'): a retry finds the run its first try created by
# this tag. A run id may hold characters (quotes) that MLflow's search filter cannot carry; the key never does.
JOB_KEY_TAG = "ec2_trainer.job_key"
# MLflow's own tag for a nested run: its UI lists the run under that parent (a sweep's run under the sweep's).
PARENT_RUN_TAG = "mlflow.parentRunId"


SETTINGS_DIGEST_TAG = "ec2_trainer.settings_digest"


def settings_digest(settings: Settings) -> str:
    """sha256 of the resolved settings as canonical JSON (sorted keys, no spaces): equal digests, equal settings.
    The settings hold no secret (credentials live in Airflow connections)."""
    canonical = json.dumps(settings.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run a DAG run trains into: its name and tags (never a secret), created before the job starts."""

    name: str
    tags: Mapping[str, str]

    @property
    def job_key(self) -> str:
        """Identifies it: one MLflow run per DAG run (as one remote job), whatever the number of task tries."""
        return self.tags[JOB_KEY_TAG]


def tracked_run(
    settings: Settings,
    ready: Mapping[str, str],
    git_sha: str,
    *,
    dag_id: str,
    run_id: str,
    try_number: int,
    dataset_tags: Mapping[str, str] | None = None,
    parent_run_id: str = "",
    image: Mapping[str, str] | None = None,
) -> TrackedRun:
    """Name and tags that lead from the MLflow run to the Airflow run, the instance, the commit and its CI checks.

    `ready` is wait_ready's result (instance id, type and market). The `mlflow.source.*` tags are MLflow's own, so
    its UI shows the commit and the repository as for a run `mlflow run` had created itself. `dataset_tags`: the
    identity of s3:// data (datasets.versions.DatasetVersion.tags). `parent_run_id` (a sweep's run) nests it from its
    creation, so a run that fails to train is still listed under its sweep. `image`: plan_launch's result, whose
    AMI id and name (`ec2.ami_id`, `ec2.ami_name`) let the run be repeated on the same image.
    """
    from orchestrator.remote_job import job_key

    parent = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
    ami = {"ec2.ami_id": image["ami_id"], "ec2.ami_name": image.get("ami_name") or "unknown"} if image else {}
    return TrackedRun(
        # The short sha first: runs of one commit sort together in the run list; the DAG run id keeps names unique.
        name=f"{git_sha[:7]} {run_id}",
        tags={
            DAG_ID_TAG: dag_id,
            DAG_RUN_ID_TAG: run_id,
            JOB_KEY_TAG: job_key(dag_id, run_id),
            "airflow.try_number": str(try_number),
            "ec2.instance_id": ready["instance_id"],
            "ec2.instance_type": ready["instance_type"],
            "ec2.market": ready["market"],
            "ci.url": commit_checks_url(settings.github.api_url, settings.github.repo, git_sha),
            "mlflow.source.git.commit": git_sha,
            "mlflow.source.name": settings.training_repo_url,
            "mlflow.source.type": "PROJECT",
            "mlflow.project.entryPoint": settings.training.entry_point,
            SETTINGS_DIGEST_TAG: settings_digest(settings),
            **(dataset_tags or {}),
            **ami,
            **parent,
        },
    )


@dataclass(frozen=True)
class TrainingCommand:
    repo_url: str
    git_sha: str
    entry_point: str
    experiment: str
    params: Mapping[str, str] = field(default_factory=dict)
    # The run created beforehand (tracking.start_training_run). Given it, `mlflow run` logs no params of its own:
    # it would log them shell-quoted ('synthetic://?...', ''), and the job logs them as it parsed them instead.
    mlflow_run_id: str | None = None

    def argv(self) -> list[str]:
        """`mlflow run` at the exact commit, in the instance's own environment (the bootstrap prepared it)."""
        args = [
            "mlflow",
            "run",
            self.repo_url,
            "--version",
            self.git_sha,
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


def training_command(settings: Settings, git_sha: str, mlflow_run_id: str | None = None) -> TrainingCommand:
    t = settings.training
    params = {**t.extra_params, **{name: _job_param(settings, name) for name in JOB_PARAMS}, "git_sha": git_sha}
    return TrainingCommand(
        repo_url=settings.training_repo_url,
        git_sha=git_sha,
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


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
