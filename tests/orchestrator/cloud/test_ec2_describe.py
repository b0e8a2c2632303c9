"""Why an instance is gone, from EC2's StateReason, as the failure messages say it."""

from __future__ import annotations

import pytest

from orchestrator.cloud.ec2_describe import InstanceInfo, instance_gone_message


def info(state: str, code: str | None = None, message: str | None = None) -> InstanceInfo:
    return InstanceInfo("i-1", state, "g6.xlarge", None, None, None, message or code, code)


@pytest.mark.parametrize("state", ["pending", "running"])
def test_a_live_instance_is_not_gone(state: str) -> None:
    assert instance_gone_message("i-1", info(state)) is None


# Every reason from a literal list (EC2's StateReason codes), with the words that tell a user which one it was.
@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("Client.InstanceInitiatedShutdown", "its max-lifetime watchdog (aws.max_lifetime_minutes)"),
        ("Server.SpotInstanceTermination", "interrupted the spot instance"),
        ("Server.SpotInstanceShutdown", "interrupted the spot instance"),
        ("Client.UserInitiatedShutdown", "the EC2 console, a script, or the reaper"),
        ("Server.ScheduledStop", "scheduled retirement"),
        ("Server.InternalError", "internal error of EC2"),
        ("Server.InsufficientInstanceCapacity", "no capacity"),
    ],
)
def test_each_reason_is_named_and_explained(code: str, words: str) -> None:
    message = instance_gone_message("i-1", info("terminated", code, f"{code}: as EC2 says it"))
    assert message is not None
    assert message.startswith(f"instance i-1 is terminated ({code}: as EC2 says it): ")
    assert words in message


def test_an_unknown_reason_is_given_in_ec2s_words_and_none_says_so() -> None:
    assert instance_gone_message("i-1", info("stopped", "Client.Other", "Client.Other: x")) == (
        "instance i-1 is stopped (Client.Other: x)"
    )
    assert instance_gone_message("i-1", info("shutting-down")) == "instance i-1 is shutting-down (EC2 gave no reason)"
    assert "EC2 no longer knows it" in str(instance_gone_message("i-1", None))
