"""Which set the sweep gates, and the summary's sentence."""

from __future__ import annotations

from orchestrator.sweeps.outcome import SetOutcome, best_set, verdict


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
