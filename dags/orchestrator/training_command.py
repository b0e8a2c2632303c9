"""The `mlflow run` invocation the instance executes, and what its output tells us: pure functions."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.settings import Settings, TrainingSettings

# MLflow prints these lines on stderr (merged into the job log) when it creates and ends the run.
_RUN_STARTED_RE = re.compile(r"=== Running command .* in run with ID '([0-9a-f]{32})' ===")
_RUN_ENDED_RE = re.compile(r"=== Run \(ID '([0-9a-f]{32})'\) (succeeded|failed) ===")

# The -P params the DAG sets from its own settings and the commit the CI gate resolved. training.extra_params may add
# others, never replace these (settings refuses them): a run's recorded params must say what it really trained.
DAG_PARAMS: Mapping[str, Callable[[TrainingSettings, str], str]] = {
    "epochs": lambda t, sha: str(t.epochs),
    "batch_size": lambda t, sha: str(t.batch_size),
    "learning_rate": lambda t, sha: repr(t.learning_rate),
    "model": lambda t, sha: t.model,
    "data_uri": lambda t, sha: t.data_uri,
    "git_sha": lambda t, sha: sha,
}


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
    params = {**t.extra_params, **{name: value(t, git_sha) for name, value in DAG_PARAMS.items()}}
    return TrainingCommand(
        repo_url=settings.training_repo_url,
        git_sha=git_sha,
        entry_point=t.entry_point,
        experiment=settings.mlflow.experiment,
        params=params,
    )


def parse_mlflow_run_id(log_text: str) -> str | None:
    """The id of the run `mlflow run` created, from its own announcement in the job log."""
    match = _RUN_STARTED_RE.search(log_text) or _RUN_ENDED_RE.search(log_text)
    return match.group(1) if match else None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
