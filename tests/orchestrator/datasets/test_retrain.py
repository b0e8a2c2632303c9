"""orchestrator.datasets.retrain and .asset: run ids per commit and data, the poll window (pure), and
the skip of a pair already trained and gated (a real MLflow server)."""

from __future__ import annotations

import uuid

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.datasets.asset import poll_window
from orchestrator.datasets.retrain import MAX_ATTEMPTS, NothingToTrain, RetrainPlan, base_run_id, training_run_id

SHA = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "ab" * 32


def test_one_run_id_per_commit_and_data() -> None:
    assert base_run_id(SHA, DIGEST) == "retrain__0123456789ab__abababababab"
    with pytest.raises(ValueError, match="hexadecimal"):
        base_run_id("main", DIGEST)


@pytest.mark.parametrize("state", [None, "queued", "running", "success"])
def test_an_existing_run_that_did_not_fail_is_reused(state: str | None) -> None:
    assert training_run_id(SHA, DIGEST, lambda run_id: state) == base_run_id(SHA, DIGEST)


def test_a_failed_training_is_tried_again_under_the_next_id() -> None:
    states = {base_run_id(SHA, DIGEST): "failed", f"{base_run_id(SHA, DIGEST)}__2": "failed"}
    assert training_run_id(SHA, DIGEST, states.get) == f"{base_run_id(SHA, DIGEST)}__3"
    with pytest.raises(NothingToTrain, match=rf"{MAX_ATTEMPTS} trainings of commit {SHA} .* failed"):
        training_run_id(SHA, DIGEST, lambda run_id: "failed")


def test_the_training_gets_the_commit_and_the_exact_version() -> None:
    plan = RetrainPlan(SHA, "s3://b/data/v2/", "v2", DIGEST)
    assert plan.conf() == {"git_ref": SHA, "data_uri": "s3://b/data/v2/"}


def test_a_poll_run_ends_before_the_next_is_due() -> None:
    assert poll_window(1) == (30.0, 5.0)
    assert poll_window(60) == (1800.0, 60.0)


def test_only_a_finished_and_gated_training_skips_the_pair(mlflow_server: MlflowServer) -> None:
    """A FINISHED run whose gate never ran (evaluate killed by an outage) must not stop the pair from training again
    (issue 19)."""
    from mlflow import MlflowClient

    from orchestrator.config.settings import load_settings
    from orchestrator.contracts import LEFT_TO_SWEEP, PROMOTION_TAG
    from orchestrator.datasets.retrain import COMMIT_TAG, gated_training
    from orchestrator.datasets.versions import DIGEST_TAG

    experiment = f"retrain-{uuid.uuid4().hex[:8]}"
    s = load_settings(
        env={
            "TRAINER__AWS__DEPLOYMENT": "test",
            "TRAINER__MLFLOW__TRACKING_URI": mlflow_server.url,
            "TRAINER__MLFLOW__EXPERIMENT": experiment,
        }
    )
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment(experiment)
    digest = "ab" * 32

    def run(status: str, promotion: str | None = None, sha: str = SHA) -> str:
        tags = {COMMIT_TAG: sha, DIGEST_TAG: digest} | ({PROMOTION_TAG: promotion} if promotion else {})
        created = client.create_run(experiment_id, tags=tags)
        if status != "RUNNING":
            client.set_terminated(created.info.run_id, status)
        return str(created.info.run_id)

    run("FINISHED")
    run("FINISHED", LEFT_TO_SWEEP)
    run("FAILED", "not_promoted")
    run("RUNNING", "promoted")
    run("FINISHED", "promoted", sha="f" * 40)
    assert gated_training(s, SHA, digest) is None
    gated = run("FINISHED", "not_promoted")
    assert gated_training(s, SHA, digest) == gated
