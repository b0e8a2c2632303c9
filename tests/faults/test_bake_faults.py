"""A bake that fails half-way (its CreateImage denied by the IAM policy, its image never available): the builder
is still terminated by the bake's teardown, and nothing is recorded."""

from __future__ import annotations

from typing import Any

import pytest

from embedded.deploy.stack import DEPLOYMENT, EmbeddedStack
from tests.support.faults import DagRunFaults
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_baked_image_after")]


def test_a_denied_create_image_fails_the_bake_and_terminates_its_builder(
    env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch, dag_faults: DagRunFaults
) -> None:
    policy_of = env.cloud.gate.policy_of

    def without_create_image(name: str) -> dict[str, Any]:
        policy = dict(policy_of(name))
        policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != "CreateImagesTaggedAsOurs"]
        return policy

    def recorded() -> str | None:
        parameters = env.cloud.client("ssm").get_parameters(Names=[f"/ec2-trainer/{DEPLOYMENT}/baked-image"])
        return next((p["Value"] for p in parameters["Parameters"]), None)

    before = recorded()
    with monkeypatch.context() as patched:
        patched.setattr(env.cloud.gate, "policy_of", without_create_image)
        dag_run = run_dag("ec2_bake_image")
        log = dag_faults.log()

    states = task_states(dag_run)
    assert dag_run.state == "failed", states
    assert (states["make_image"], states["prune"], states["terminate"]) == ("failed", "upstream_failed", "success")
    tries = {ti.task_id: ti.try_number for ti in dag_run.get_task_instances()}
    assert tries["make_image"] == 1, "a refusal by the policy fails at once: no retry changes the policy"
    (builder,) = assert_all_terminated(env, dag_run, 1)
    assert "ec2:CreateImage was refused (UnauthorizedOperation" in log and "config/iam/airflow.json" in log
    assert f"Instance {builder}: terminated" in log
    assert recorded() == before
    dag_faults.record(
        dag_run,
        log,
        "ec2_bake_image: CreateImage denied by the IAM policy (UnauthorizedOperation) after the builder stopped",
        "bake fails in make_image; the teardown terminates the builder; nothing recorded",
        "make_image failed on its first try (UnauthorizedOperation, terminal), terminate success; 1 builder, "
        "terminated; SSM parameter unchanged; run failed",
    )
