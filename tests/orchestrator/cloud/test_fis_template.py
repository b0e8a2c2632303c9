"""config/fis/: the AWS FIS experiment that rehearses a spot interruption on real AWS (docs/production.md) finds a
run's instance by the tags launch gives it, so a renamed tag fails here rather than in a paid rehearsal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.cloud.launch_spec import run_scope_tags
from orchestrator.contracts import TAG_DAG_ID, TAG_PROJECT

FIS = Path(__file__).resolve().parents[3] / "config" / "fis"


def _load(name: str) -> Any:
    return json.loads((FIS / name).read_text())


def test_the_experiment_interrupts_the_runs_spot_instance_two_minutes_after_the_notice() -> None:
    template = _load("spot-interruption.json")
    (action,) = template["actions"].values()
    assert action["actionId"] == "aws:ec2:send-spot-instance-interruptions"
    assert action["parameters"] == {"durationBeforeInterruption": "PT2M"}
    target = template["targets"][action["targets"]["SpotInstances"]]
    assert target["resourceType"] == "aws:ec2:spot-instance"
    assert target["selectionMode"] == "COUNT(1)"
    assert set(target["resourceTags"]) == set(run_scope_tags("project", "deployment", "ec2_training", "run"))
    assert target["resourceTags"][TAG_DAG_ID] == "ec2_training"
    assert template["roleArn"] == "<ROLE_ARN>"


def test_the_role_fis_assumes_may_interrupt_only_this_projects_instances() -> None:
    assert _load("trust.json")["Statement"][0]["Principal"] == {"Service": "fis.amazonaws.com"}
    statements = {statement["Action"]: statement for statement in _load("role-policy.json")["Statement"]}
    assert set(statements) == {"ec2:DescribeInstances", "ec2:SendSpotInstanceInterruptions"}
    condition = statements["ec2:SendSpotInstanceInterruptions"]["Condition"]["StringEquals"]
    assert condition == {f"aws:ResourceTag/{TAG_PROJECT}": "<PROJECT>"}
