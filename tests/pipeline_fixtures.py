"""Fixtures and helpers for tests that run the training DAG on the embedded default (registered in conftest).

One embedded stack serves the whole session; a test that changes its state (scripted CI runs, injected faults)
restores it before it ends.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.stack import EmbeddedStack, TrainingKnobs
from tests.conftest import REPO

TINY_DATA = "synthetic://?train_per_class=40&val_per_class=10&test_per_class=10&size=64&seed=0"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, airflow_db: Any) -> Iterator[EmbeddedStack]:
    knobs = TrainingKnobs(epochs=1, batch_size=16, data_uri=TINY_DATA, image_size=64, threshold=0.0)
    with EmbeddedStack(tmp_path_factory.mktemp("embedded"), REPO, knobs=knobs) as running:
        yield running


@pytest.fixture
def env(stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> EmbeddedStack:
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    return stack


@pytest.fixture(scope="session")
def sha() -> str:
    """The commit under test: the instance clones it from the git daemon, the GitHub stand-in answers for it."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture
def planted(env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Known secret values set in every connection the run uses; none may show up anywhere readable."""
    secrets = {
        "aws": "planted-aws-secret-key-0123456789",
        "mlflow": "planted-mlflow-password-0123456789",
        "github": env.github_token,
        "ssh": env.ssh_private_key.splitlines()[2],  # a line of the key's base64 body
    }
    aws = json.loads(env.environment()["AIRFLOW_CONN_AWS_DEFAULT"])
    aws.update(login="AKIAPLANTEDKEYID0000", password=secrets["aws"])
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "http", "login": "trainer", "password": secrets["mlflow"]}),
    )
    return secrets


def run_dag(**conf: Any) -> Any:
    from embedded.demo import trigger

    return trigger(conf)


def task_states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def instances_of(stack: EmbeddedStack, dag_run: Any) -> dict[str, dict[str, Any]]:
    ec2 = stack.cloud.client("ec2")
    found = {}
    for reservation in ec2.describe_instances(Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [dag_run.run_id]}])[
        "Reservations"
    ]:
        for inst in reservation["Instances"]:
            found[inst["InstanceId"]] = inst
    return found


def assert_all_terminated(stack: EmbeddedStack, dag_run: Any, expected_count: int) -> dict[str, dict[str, Any]]:
    found = instances_of(stack, dag_run)
    assert len(found) == expected_count, f"expected {expected_count} instance(s), found {sorted(found)}"
    assert {i["State"]["Name"] for i in found.values()} <= {"terminated"}, {
        k: v["State"]["Name"] for k, v in found.items()
    }
    return found
