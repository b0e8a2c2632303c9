"""ec2_bake_image end to end on the embedded default: the builder boots the base image in bake mode, its image is
made, recorded and booted by the next training, which skips what the image already has; the builder never outlives
the run."""

from __future__ import annotations

from typing import Any

import pytest

from embedded.deploy.stack import EmbeddedStack
from tests.support.faults import output
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_baked_image_after")]


def test_a_baked_image_is_made_recorded_and_booted_by_the_next_training(
    env: EmbeddedStack, sha: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.config.settings import load_settings

    deployment = load_settings().aws.deployment
    bake = run_dag("ec2_bake_image")
    log = output(capfd, caplog)
    assert bake.state == "success", task_states(bake)
    (builder,) = assert_all_terminated(env, bake, 1)
    image_id = env.cloud.client("ssm").get_parameter(Name=f"/ec2-trainer/{deployment}/baked-image")["Parameter"][
        "Value"
    ]
    assert f"Creating {image_id} (" in log and f"from {builder}" in log
    assert "bootstrap | " in log and "[bake] done" in log

    training = run_dag(git_ref=sha)
    log = output(capfd, caplog)
    states = task_states(training)
    assert training.state == "success", states
    (instance_id,) = assert_all_terminated(env, training, 1)
    launched: Any = env.cloud.client("ec2").describe_instances(InstanceIds=[instance_id])
    assert launched["Reservations"][0]["Instances"][0]["ImageId"] == image_id
    assert f"Booting the baked image {image_id}" in log
    # The image carried the bake's marker: this boot's bootstrap found it and skipped what it installed.
    assert "baked image of this bootstrap" in log and "skipped: mlflow" in log
    # The report shows the baked boot's bootstrap: the skipped steps still timed, the whole beside them (`pytest -rP`
    # prints the figures, docs/benchmarks.md "On paper").
    from orchestrator.observe.report import RunReport

    report = RunReport.from_dict(
        next(ti for ti in training.get_task_instances() if ti.task_id == "report").xcom_pull(task_ids="report")
    )
    phases = report.phases_s
    assert {"bootstrap", "bootstrap.packages", "bootstrap.python", "training.before_first_epoch"} <= phases.keys()
    assert report.seconds_to_first_epoch is not None and report.seconds_to_first_epoch > 0
    print(f"baked boot on the emulator: phases {phases}; CI passed to first epoch {report.seconds_to_first_epoch} s")
