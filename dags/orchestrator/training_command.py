"""The `mlflow run` invocation the instance executes, and what its output tells us: pure functions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class TrainingCommand:
    repo_url: str
    git_sha: str
    entry_point: str
    experiment: str
    params: Mapping[str, str] = field(default_factory=dict)

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
        for key in sorted(self.params):
            args += ["-P", f"{key}={self.params[key]}"]
        return args


def training_command(settings: Settings, git_sha: str) -> TrainingCommand:
    t = settings.training
    params = {**t.extra_params, **{name: _job_param(settings, name) for name in JOB_PARAMS}, "git_sha": git_sha}
    return TrainingCommand(
        repo_url=settings.training_repo_url,
        git_sha=git_sha,
        entry_point=t.entry_point,
        experiment=settings.mlflow.experiment,
        params=params,
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
