"""orchestrator.observe.verdict: the run's outcome from its steps' states, whatever its teardowns did."""

from __future__ import annotations

import pytest

from orchestrator.observe.verdict import decide, unfinished_run_end

TEARDOWNS = ("terminate", "report", "verdict")
STEPS = ("resolve_config", "ci_gate", "plan_launch", "launch", "wait_ready", "train", "evaluate")


def states(**overrides: str | None) -> dict[str, str | None]:
    every = {step: "success" for step in STEPS} | {teardown: "success" for teardown in TEARDOWNS}
    return every | overrides


def test_every_step_succeeded() -> None:
    verdict = decide(states(), TEARDOWNS)
    assert verdict.ok and not verdict.stopped
    assert verdict.reason == f"all {len(STEPS)} steps succeeded"


@pytest.mark.parametrize("teardown", TEARDOWNS)
@pytest.mark.parametrize("state", ["failed", "upstream_failed", "skipped", None])
def test_a_teardown_never_decides(teardown: str, state: str | None) -> None:
    assert decide(states(**{teardown: state}), TEARDOWNS).ok


@pytest.mark.parametrize("step", STEPS)
def test_any_failed_step_fails_the_run(step: str) -> None:
    verdict = decide(states(**{step: "failed"}), TEARDOWNS)
    assert not verdict.ok and not verdict.stopped
    assert verdict.reason == f"{step} failed"


def test_steps_after_a_failure_are_named_as_not_run() -> None:
    verdict = decide(states(train="upstream_failed", evaluate="upstream_failed"), TEARDOWNS)
    assert not verdict.ok
    assert verdict.reason == "evaluate, train did not run: a step before failed"


def test_a_run_marked_failed_while_training_is_stopped_by_hand() -> None:
    """Airflow fails the running step and skips the pending ones; the leaf left (evaluate) is skipped, which
    Airflow alone reads as success."""
    verdict = decide(states(train="failed", evaluate="skipped"), TEARDOWNS)
    assert not verdict.ok and verdict.stopped
    assert verdict.reason == "the run was stopped by hand: train failed, evaluate never ran"


def test_a_run_marked_success_before_its_last_step_ran_is_not_a_success() -> None:
    verdict = decide(states(evaluate="skipped"), TEARDOWNS)
    assert not verdict.ok and verdict.stopped
    assert verdict.reason == "the run was stopped by hand: evaluate never ran"


@pytest.mark.parametrize("state", [None, "removed", "running", "deferred", "up_for_retry"])
def test_a_step_that_did_not_finish_fails_the_run(state: str | None) -> None:
    verdict = decide(states(evaluate=state), TEARDOWNS)
    assert not verdict.ok and not verdict.stopped
    assert verdict.reason == f"steps did not finish (evaluate: {state or 'no state'})"


def test_a_run_of_teardowns_only_is_not_a_success() -> None:
    assert not decide({"terminate": "success"}, TEARDOWNS).ok


@pytest.mark.parametrize(
    ("mlflow_status", "train_state", "stopped", "expected"),
    [
        ("RUNNING", "failed", False, "FAILED"),
        ("RUNNING", "upstream_failed", False, "FAILED"),
        ("RUNNING", "failed", True, "KILLED"),
        ("RUNNING", "skipped", True, "KILLED"),
        ("RUNNING", "success", False, None),
        ("RUNNING", "success", True, None),
        ("RUNNING", "", False, None),
        ("FINISHED", "failed", False, None),
        ("FAILED", "failed", True, None),
        ("KILLED", "failed", True, None),
    ],
)
def test_an_mlflow_run_left_running_by_an_unfinished_train_is_ended_for_its_reason(
    mlflow_status: str, train_state: str, stopped: bool, expected: str | None
) -> None:
    assert unfinished_run_end(mlflow_status, train_state, stopped) == expected
