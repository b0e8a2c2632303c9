"""Which set the sweep gates, the verdict's sentence, and the summary a person reads."""

from __future__ import annotations

from orchestrator.contracts_steps import Evaluation
from orchestrator.sweeps.outcome import SetOutcome, best_set, summary, verdict


def outcome(number: int, state: str = "success", value: float | None = 0.5, status: str = "FINISHED") -> SetOutcome:
    return SetOutcome(number, {"learning_rate": number / 1000}, f"run__set{number}", state, f"m{number}", status, value)


def test_the_best_successful_set_wins_and_a_failed_one_never_does() -> None:
    sets = [outcome(1, value=0.7), outcome(2, state="failed", value=0.99), outcome(3, value=0.8)]
    assert best_set(sets, greater_is_better=True) == sets[2]
    assert best_set(sets, greater_is_better=False) == sets[0]


def test_ties_go_to_the_earlier_set() -> None:
    sets = [outcome(1, value=0.8), outcome(2, value=0.8)]
    assert best_set(sets, greater_is_better=True) == sets[0]
    assert best_set(sets, greater_is_better=False) == sets[0]


def test_no_set_qualifies_without_a_finished_run_and_a_metric() -> None:
    sets = [
        outcome(1, state="failed"),
        outcome(2, value=None),
        outcome(3, status="FAILED"),
        SetOutcome(4, {}, "run__set4", "not created"),
    ]
    assert best_set(sets, greater_is_better=True) is None


def test_the_verdict_counts_and_names_the_failed_sets() -> None:
    ok, sentence = verdict([outcome(1), outcome(2, state="failed"), outcome(3)])
    assert not ok
    assert sentence == "1 of 3 sets failed: set 2 (learning_rate=0.002): ec2_training run run__set2 failed"
    assert verdict([outcome(1), outcome(2)]) == (True, "all 2 sets succeeded")
    ok, sentence = verdict([SetOutcome(1, {}, "r1", "not created"), outcome(2, state="failed")])
    assert sentence.startswith("2 of 2 sets failed: set 1 (the configured values): ec2_training run r1 not created; ")


def test_a_set_whose_mlflow_run_did_not_finish_failed_whatever_its_dag_run_says() -> None:
    ok, sentence = verdict([outcome(1), outcome(2, status="KILLED"), SetOutcome(3, {}, "r3", "success")])
    assert not ok
    assert sentence == (
        "1 of 3 sets failed: set 2 (learning_rate=0.002): ec2_training run run__set2 success, MLflow run m2 KILLED"
    )


PARENT = "http://127.0.0.1:5000/#/experiments/1/runs/p1"


def gated(promoted: bool, reason: str) -> dict[str, object]:
    evaluation = Evaluation("m3", "test_accuracy", 0.8, 0.7, promoted, reason, "4" if promoted else None)
    return {"best_set": 3, "best_run_id": "m3", "evaluation": evaluation.to_xcom()}


def test_the_summary_names_the_best_set_its_metric_the_gates_verdict_and_the_parent_run() -> None:
    sets = [outcome(1, value=0.7), outcome(2, value=0.75), outcome(3, value=0.8)]
    ok, text = summary(
        sets,
        gated(True, "0.8000 beats the champion's 0.7000"),
        metric="test_accuracy",
        greater_is_better=True,
        parent_url=PARENT,
    )
    assert ok
    assert text == (
        "all 3 sets succeeded; best: set 3 (learning_rate=0.003), test_accuracy = 0.8000; "
        "champion gate: promoted as version 4 (0.8000 beats the champion's 0.7000); "
        f"parent MLflow run: {PARENT}"
    )


def test_a_failed_sweeps_summary_still_names_the_best_set_and_why_it_was_not_promoted() -> None:
    sets = [outcome(1, value=0.7), outcome(2, state="failed"), outcome(3, value=0.8)]
    ok, text = summary(
        sets,
        gated(False, "0.8000 is below the threshold 0.9"),
        metric="test_accuracy",
        greater_is_better=True,
        parent_url=PARENT,
    )
    assert not ok
    assert text.startswith("1 of 3 sets failed: set 2 (learning_rate=0.002): ec2_training run run__set2 failed; ")
    assert "; best: set 3 (learning_rate=0.003), test_accuracy = 0.8000; " in text
    assert "; champion gate: not promoted (0.8000 is below the threshold 0.9); " in text
    assert text.endswith(f"; parent MLflow run: {PARENT}")


def test_the_summary_when_no_set_could_be_gated_or_the_gate_did_not_finish() -> None:
    failed = [outcome(1, state="failed"), outcome(2, state="failed")]
    ok, text = summary(failed, {"best_set": None}, metric="test_accuracy", greater_is_better=True, parent_url=PARENT)
    assert not ok
    assert "; best: none; champion gate: no set to gate, the champion stays; parent MLflow run: " in text
    # Every set succeeded, but the gate's task failed: the sweep did not do its job.
    ok, text = summary([outcome(1), outcome(2)], None, metric="loss", greater_is_better=False, parent_url=PARENT)
    assert not ok
    assert text == (
        "all 2 sets succeeded; best: set 1 (learning_rate=0.001), loss = 0.5000; "
        f"the champion gate did not finish: its log says why; parent MLflow run: {PARENT}"
    )
