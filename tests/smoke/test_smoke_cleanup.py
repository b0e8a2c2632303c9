"""The AWS smoke test's cleanup, with no AWS: it selects only this deployment's instances of the training DAG, and a
failing cleanup never hides the run's own failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.smoke.test_aws_smoke import run_instances, run_then_clean
from tests.support.aws_cloud import in_process_aws


def test_cleanup_selects_only_this_deployments_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from orchestrator.cloud.launch_spec import deployment_tags
    from orchestrator.contracts import TAG_DAG_ID, TAG_RUN_ID

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    with in_process_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

        def launch(deployment: str, run_id: str) -> str:
            tags = {**deployment_tags("ec2-trainer", deployment), TAG_DAG_ID: "ec2_training", TAG_RUN_ID: run_id}
            spec = {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            answer = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[spec])
            return str(answer["Instances"][0]["InstanceId"])

        own = launch("smoke", "run-1")
        launch("other-team", "run-1")  # same project and run id, another deployment: never ours to terminate
        before = datetime.now(tz=UTC) - timedelta(minutes=5)
        assert run_instances(ec2, "ec2-trainer", "smoke", before, "run-1") == [own]
        assert run_instances(ec2, "ec2-trainer", "smoke", before, None) == [own]


def test_a_failing_cleanup_is_raised_with_the_runs_own_failure() -> None:
    def run() -> None:
        raise RuntimeError("DAG run failed at train")

    def failing_clean(result: object) -> list[str]:
        raise PermissionError("UnauthorizedOperation on TerminateInstances")

    with pytest.raises(BaseExceptionGroup, match="the smoke run failed and so did its cleanup") as raised:
        run_then_clean(run, failing_clean)
    assert [type(e) for e in raised.value.exceptions] == [RuntimeError, PermissionError]

    cleaned: list[object] = []

    def clean(result: object) -> list[str]:
        cleaned.append(result)
        return []

    with pytest.raises(RuntimeError, match="DAG run failed at train"):
        run_then_clean(run, clean)
    assert cleaned == [None]
    assert run_then_clean(lambda: "run", lambda result: [f"i-{result}"]) == ("run", ["i-run"])
