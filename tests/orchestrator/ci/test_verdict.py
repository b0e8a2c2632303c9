"""The CI verdict over every status, conclusion and re-run case, with no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.ci.verdict import (
    KNOWN_CONCLUSIONS,
    MalformedRunError,
    WorkflowRun,
    evaluate_ci,
    latest_attempts,
    parse_allowed_conclusions,
)
from orchestrator.errors import ConfigError

SHA = "a" * 40


def run(**overrides: Any) -> WorkflowRun:
    fields: dict[str, Any] = {
        "id": 1,
        "name": "CI",
        "workflow_id": 10,
        "head_sha": SHA,
        "status": "completed",
        "conclusion": "success",
        "run_attempt": 1,
        "html_url": "https://github.com/o/r/actions/runs/1",
        "created_at": "2024-05-01T10:00:00Z",
    }
    fields.update(overrides)
    return WorkflowRun(**fields)


def test_from_api_reads_a_run_and_to_dict_round_trips() -> None:
    data = {**run().to_dict(), "extra_field": "ignored"}
    parsed = WorkflowRun.from_api(data)
    assert parsed == run()
    assert WorkflowRun.from_api(parsed.to_dict()) == parsed


def test_from_api_defaults_run_attempt_to_one() -> None:
    data = run(run_attempt=3).to_dict()
    del data["run_attempt"]
    assert WorkflowRun.from_api(data).run_attempt == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"id": "12"}, "'id' must be an integer"),
        ({"id": True}, "'id' must be an integer"),
        ({"name": 3}, "'name' must be a string or null"),
        ({"status": ["completed"]}, "'status' must be a string or null"),
        ({"created_at": None}, "'created_at' must be a string"),
        ({"conclusion": 3}, "'conclusion' must be a string or null"),
        ({"workflow_id": None}, "'workflow_id' is missing"),
    ],
)
def test_from_api_names_the_bad_field(change: dict[str, Any], match: str) -> None:
    data = {**run().to_dict(), **change}
    with pytest.raises(MalformedRunError, match=match):
        WorkflowRun.from_api(data)


# GitHub's REST description: `name` is optional and nullable, `status` nullable, `run_attempt`, `run_started_at`
# optional; the runs API recorded in 2020-2021 answered runs with no `name` at all.
LEGACY_RUN = {
    "id": 30433642,
    "node_id": "MDEyOldvcmtmbG93IFJ1bjI2OTI4OQ==",
    "head_branch": "master",
    "head_sha": SHA,
    "run_number": 562,
    "event": "push",
    "status": "completed",
    "conclusion": "success",
    "workflow_id": 159038,
    "url": "https://api.github.com/repos/o/r/actions/runs/30433642",
    "html_url": "https://github.com/o/r/actions/runs/30433642",
    "created_at": "2020-01-22T19:33:08Z",
    "updated_at": "2020-01-22T19:33:08Z",
}


def test_from_api_reads_a_run_without_name_attempt_or_start() -> None:
    parsed = WorkflowRun.from_api(LEGACY_RUN)
    assert (parsed.name, parsed.run_attempt, parsed.started_at) == (None, 1, "2020-01-22T19:33:08Z")
    assert parsed.label == "workflow 159038"
    assert WorkflowRun.from_api(parsed.to_dict()) == parsed
    assert evaluate_ci([parsed]).state == "success"


def test_label_falls_back_to_the_workflow_file() -> None:
    for path in (".github/workflows/build.yml", "o/r/.github/workflows/build.yml@main"):
        parsed = WorkflowRun.from_api({**LEGACY_RUN, "name": None, "path": path})
        assert parsed.label == "build.yml"
        assert parsed.describe() == "'build.yml' completed/success"


def test_null_status_is_pending_not_malformed() -> None:
    parsed = WorkflowRun.from_api({**LEGACY_RUN, "name": "CI", "status": None, "conclusion": None})
    verdict = evaluate_ci([parsed])
    assert verdict.state == "pending"
    assert "'CI' -/-" in verdict.message


def test_from_api_missing_field_and_non_object() -> None:
    data = run().to_dict()
    del data["html_url"]
    with pytest.raises(MalformedRunError, match="'html_url' is missing"):
        WorkflowRun.from_api(data)
    with pytest.raises(MalformedRunError, match="expected a workflow run object, got list"):
        WorkflowRun.from_api([1, 2])  # type: ignore[arg-type]


def test_no_runs() -> None:
    verdict = evaluate_ci([])
    assert verdict.state == "no_runs"
    assert verdict.runs == ()


def test_all_success() -> None:
    runs = [run(), run(id=2, name="Lint", workflow_id=11)]
    verdict = evaluate_ci(runs)
    assert verdict.state == "success"
    assert {r.name for r in verdict.runs} == {"CI", "Lint"}
    assert "all 2 workflow(s) passed" in verdict.message


@pytest.mark.parametrize("conclusion", sorted(KNOWN_CONCLUSIONS - {"success"}))
def test_every_other_conclusion_fails_by_default(conclusion: str) -> None:
    bad = run(id=2, name="Lint", workflow_id=11, conclusion=conclusion, html_url="https://x/runs/2")
    verdict = evaluate_ci([run(), bad])
    assert verdict.state == "failed"
    assert verdict.failing == (bad,)
    assert "'Lint'" in verdict.message
    assert conclusion in verdict.message
    assert "https://x/runs/2" in verdict.message


@pytest.mark.parametrize("conclusion", ["skipped", "neutral"])
def test_allowed_conclusions_pass(conclusion: str) -> None:
    verdict = evaluate_ci([run(), run(id=2, workflow_id=11, conclusion=conclusion)], {"skipped", "neutral"})
    assert verdict.state == "success"


def test_allowing_skipped_does_not_allow_failure() -> None:
    verdict = evaluate_ci([run(conclusion="failure")], {"skipped"})
    assert verdict.state == "failed"


def test_completed_without_conclusion_fails() -> None:
    verdict = evaluate_ci([run(conclusion=None)])
    assert verdict.state == "failed"
    assert "completed/-" in verdict.message


@pytest.mark.parametrize("status", ["queued", "in_progress", "waiting", "requested", "pending"])
def test_unfinished_status_is_pending(status: str) -> None:
    verdict = evaluate_ci([run(), run(id=2, name="Slow", workflow_id=11, status=status, conclusion=None)])
    assert verdict.state == "pending"
    assert "waiting for 1 of 2" in verdict.message
    assert f"'Slow' {status}" in verdict.message


def test_failure_decides_while_others_still_run() -> None:
    runs = [run(status="in_progress", conclusion=None), run(id=2, workflow_id=11, conclusion="timed_out")]
    assert evaluate_ci(runs).state == "failed"


def test_rerun_success_overrides_failed_attempt() -> None:
    runs = [run(run_attempt=1, conclusion="failure"), run(run_attempt=2, conclusion="success")]
    verdict = evaluate_ci(runs)
    assert verdict.state == "success"
    assert verdict.runs[0].run_attempt == 2


def test_rerun_failure_overrides_earlier_success() -> None:
    runs = [run(run_attempt=2, conclusion="cancelled"), run(run_attempt=1)]
    assert evaluate_ci(runs).state == "failed"


def test_rerun_in_progress_is_pending_even_after_a_failure() -> None:
    runs = [run(run_attempt=1, conclusion="failure"), run(run_attempt=2, status="queued", conclusion=None)]
    assert evaluate_ci(runs).state == "pending"


def test_newest_run_of_a_workflow_decides() -> None:
    old = run(id=1, created_at="2024-05-01T10:00:00Z", conclusion="failure")
    new = run(id=5, created_at="2024-05-01T11:00:00Z", conclusion="success")
    assert latest_attempts([new, old]) == (new,)
    assert evaluate_ci([old, new]).state == "success"


def test_green_rerun_of_an_older_run_decides_over_a_newer_red_run() -> None:
    # Run 1 (push) failed, run 2 (created later, e.g. workflow_dispatch) failed, then run 1 was re-run and passed:
    # its created_at stays the first attempt's, run_started_at is the re-run's.
    rerun = run(id=1, run_attempt=2, created_at="2024-05-01T10:00:00Z", run_started_at="2024-05-01T12:00:00Z")
    newer_red = run(
        id=2, created_at="2024-05-01T11:00:00Z", run_started_at="2024-05-01T11:00:00Z", conclusion="failure"
    )
    assert latest_attempts([newer_red, rerun]) == (rerun,)
    assert evaluate_ci([rerun, newer_red]).state == "success"


def test_red_rerun_of_an_older_run_decides_over_a_newer_green_run() -> None:
    rerun = run(
        id=1,
        run_attempt=2,
        created_at="2024-05-01T10:00:00Z",
        run_started_at="2024-05-01T12:00:00Z",
        conclusion="failure",
    )
    newer_green = run(id=2, created_at="2024-05-01T11:00:00Z", run_started_at="2024-05-01T11:00:00Z")
    assert evaluate_ci([newer_green, rerun]).state == "failed"


def test_latest_attempt_of_a_run_id_decides_whatever_the_order() -> None:
    first = run(id=3, run_attempt=1, conclusion="failure", run_started_at="2024-05-01T10:00:00Z")
    second = run(id=3, run_attempt=2, run_started_at="2024-05-01T10:30:00Z")
    assert latest_attempts([second, first]) == (second,)
    assert latest_attempts([first, second]) == (second,)


def test_parse_allowed_conclusions() -> None:
    assert parse_allowed_conclusions(None) == frozenset()
    assert parse_allowed_conclusions("skipped, Neutral,") == {"skipped", "neutral"}
    assert parse_allowed_conclusions(["skipped"]) == {"skipped"}
    with pytest.raises(ConfigError, match=r"unknown value\(s\) \['skiped'\]"):
        parse_allowed_conclusions("skiped")


def test_each_verdict_is_whole_message_failing_and_deciding_runs() -> None:
    """Every field of each verdict, with two workflows so the lists' separators count (mutation testing found the
    messages and the run tuples unchecked)."""
    from orchestrator.ci.verdict import CiVerdict

    url = "https://github.com/o/r/actions/runs/"
    lint = run(id=2, name="Lint", workflow_id=11, html_url=f"{url}2")
    assert evaluate_ci([]) == CiVerdict("no_runs", "no GitHub Actions workflow run found for this commit yet", (), ())
    red = run(conclusion="failure")
    red_lint = run(id=2, name="Lint", workflow_id=11, html_url=f"{url}2", conclusion="timed_out")
    assert evaluate_ci([red, red_lint]) == CiVerdict(
        "failed",
        f"CI failed: workflow 'CI' completed/failure: {url}1; workflow 'Lint' completed/timed_out: {url}2",
        (red, red_lint),
        (red, red_lint),
    )
    busy = run(status="in_progress", conclusion=None)
    queued = run(id=2, name="Lint", workflow_id=11, status="queued", conclusion=None)
    assert evaluate_ci([busy, queued]) == CiVerdict(
        "pending", "waiting for 2 of 2 workflow(s): 'CI' in_progress/-, 'Lint' queued/-", (), (busy, queued)
    )
    assert evaluate_ci([run(), lint]) == CiVerdict(
        "success", "all 2 workflow(s) passed: 'CI' completed/success, 'Lint' completed/success", (), (run(), lint)
    )


def test_every_field_round_trips_and_a_wrong_type_names_its_field() -> None:
    # run_attempt 2, not the default 1: a key read wrongly would fall back to 1 unseen.
    full = run(run_attempt=2, run_started_at="2024-05-01T10:05:00Z", path=".github/workflows/ci.yml@refs/heads/main")
    assert full.to_dict() == {
        "id": 1,
        "name": "CI",
        "workflow_id": 10,
        "head_sha": SHA,
        "status": "completed",
        "conclusion": "success",
        "run_attempt": 2,
        "html_url": "https://github.com/o/r/actions/runs/1",
        "created_at": "2024-05-01T10:00:00Z",
        "run_started_at": "2024-05-01T10:05:00Z",
        "path": ".github/workflows/ci.yml@refs/heads/main",
    }
    assert WorkflowRun.from_api(full.to_dict()) == full
    for key in ("run_started_at", "path"):
        with pytest.raises(
            MalformedRunError, match=rf"malformed workflow run 1: field '{key}' must be a string or null, got 3"
        ):
            WorkflowRun.from_api({**full.to_dict(), key: 3})
    without_id = {key: value for key, value in full.to_dict().items() if key != "id"}
    with pytest.raises(MalformedRunError, match=r"malformed workflow run '\?': .*'id'"):
        WorkflowRun.from_api(without_id)
