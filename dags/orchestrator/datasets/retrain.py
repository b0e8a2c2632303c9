"""What ec2_retrain decides: the latest complete version, the commit, and whether that pair was already trained.

The training run is identified by (commit, dataset digest): its DAG run id derives from both, so a burst of dataset
events (several ec2_retrain runs) starts one ec2_training run; MLflow's tags say whether the pair already trained.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config.settings import Settings
from orchestrator.contracts import RETRAIN_RUN_PREFIX
from orchestrator.datasets.versions import DIGEST_TAG
from orchestrator.tracking.training_runs import TRAINING_DAG_ID, training_run_state

log = logging.getLogger(__name__)

COMMIT_TAG = "mlflow.source.git.commit"  # set on every training run (instance.command.tracked_run)
_HEX_RE = re.compile(r"[0-9a-f]+")
# A training of the same commit and data that failed is tried again under a new run id, at most this many times.
MAX_ATTEMPTS = 20


class NothingToTrain(Exception):
    """Retraining would spend GPU time for nothing (or on nothing); the message says why."""


@dataclass(frozen=True)
class RetrainPlan:
    git_sha: str
    data_uri: str
    version: str
    digest: str

    def conf(self) -> dict[str, str]:
        """The ec2_training run's conf (its Params): the commit and the version's exact URI."""
        return {"git_ref": self.git_sha, "data_uri": self.data_uri}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_run_id(git_sha: str, digest: str) -> str:
    if not (_HEX_RE.fullmatch(git_sha) and _HEX_RE.fullmatch(digest)):
        raise ValueError("a commit sha and a dataset digest in hexadecimal")
    return f"{RETRAIN_RUN_PREFIX}{git_sha[:12]}__{digest[:12]}"


def training_run_id(git_sha: str, digest: str, state_of: Callable[[str], str | None]) -> str:
    """The ec2_training run id for this commit and data: the first of `base`, `base__2`, ... that does not exist or
    has not failed (`state_of(run_id)`: its state, None when there is none). An existing one that is queued, running
    or succeeded is returned as is: triggering it again is skipped (skip_when_already_exists)."""
    base = base_run_id(git_sha, digest)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        run_id = base if attempt == 1 else f"{base}__{attempt}"
        if state_of(run_id) != "failed":
            return run_id
    raise NothingToTrain(
        f"{MAX_ATTEMPTS} trainings of commit {git_sha} on dataset digest {digest} failed ({base}...): fix the cause "
        "(their logs say it) before retraining this pair again; a new commit or new data starts afresh"
    )


def plan(s: Settings) -> RetrainPlan:
    """The latest complete dataset version and the retrained branch's commit; NothingToTrain when there is no
    complete version, or when MLflow already has a finished and gated training of that commit on that data."""
    from orchestrator.ci.github import GitHubClient
    from orchestrator.config.connections import aws_client
    from orchestrator.datasets.s3 import scan
    from orchestrator.datasets.versions import latest

    d = s.datasets
    if not d.uri:
        raise NothingToTrain(
            "datasets.uri is not set, so there is no dataset to retrain on: set TRAINER__DATASETS__URI "
            "(docs/operations.md, 'Retrain on new data and on a schedule')"
        )
    complete, incomplete = scan(aws_client("s3", s.aws.conn_id, s.aws.region), d)
    version = latest(complete)
    if version is None:
        waiting = f"; without their marker (still uploading?): {', '.join(incomplete)}" if incomplete else ""
        raise NothingToTrain(
            f"no complete dataset version under {d.uri} (a version is complete once its {d.marker!r} object is "
            f"written){waiting}"
        )
    if incomplete:
        log.info("Not complete yet, left out: %s", ", ".join(incomplete))
    ref = s.retrain.ref(s.github)
    client = GitHubClient.from_connection(s.github.conn_id, s.github.api_url, s.github.repo)
    sha = client.resolve_ref(ref)
    log.info(
        "Latest complete version %r (%s, %d objects, digest %s); %r is commit %s",
        version.name,
        version.uri,
        len(version.objects),
        version.digest,
        ref,
        sha,
    )
    trained = gated_training(s, sha, version.digest)
    if trained:
        raise NothingToTrain(
            f"nothing changed: MLflow run {trained} already trained commit {sha} on this data (version "
            f"{version.name!r}, digest {version.digest}) and was gated; push a commit or upload a new version to "
            "retrain"
        )
    return RetrainPlan(sha, version.uri, version.name, version.digest)


def gated_training(s: Settings, git_sha: str, digest: str) -> str | None:
    """The id of a FINISHED MLflow run of this commit on data of this digest whose gate decided, if there is one.

    A run that finished but was never gated (its DAG run failed after the training: evaluate never ran) is no
    reason to skip: its model was neither promoted nor refused, so the pair trains again."""
    from orchestrator.config.connections import mlflow_credentials
    from orchestrator.tracking.runs import credentials_in_env, find_finished_run

    creds = mlflow_credentials(s.mlflow.conn_id)
    with credentials_in_env(creds.username, creds.password):
        return find_finished_run(
            s.mlflow.tracking_uri, s.mlflow.experiment, {COMMIT_TAG: git_sha, DIGEST_TAG: digest}, gated=True
        )


def resolve(s: Settings, ti: Any) -> dict[str, Any]:
    """ec2_retrain's first step: the plan, the training's conf and its run id; skips (AirflowSkipException) with the
    reason when there is nothing to train; fails without retry on a missing bucket, branch or commit, or a
    repository the GitHub connection cannot read."""
    from airflow.sdk.exceptions import AirflowSkipException

    from orchestrator.ci.github_protocol import GitHubResponseError
    from orchestrator.errors import fail_without_retry

    # Named here, not terminal: train retries an archive answer it cannot read.
    with fail_without_retry(GitHubResponseError):
        try:
            found = plan(s)
            run_id = training_run_id(found.git_sha, found.digest, lambda run_id: training_run_state(ti, run_id))
        except NothingToTrain as exc:
            log.info("Skipped: %s", exc)
            raise AirflowSkipException(str(exc)) from None
    log.info("Training %s on %s as %s run %s", found.git_sha, found.data_uri, TRAINING_DAG_ID, run_id)
    return {"conf": found.conf(), "run_id": run_id, "plan": found.to_dict()}
