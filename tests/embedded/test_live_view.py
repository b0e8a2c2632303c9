"""make demo's live view: what it picks from task states and task logs, and the summary it prints."""

from __future__ import annotations

import json
from pathlib import Path

from embedded.cli.live_view import (
    LogFollower,
    RunSummary,
    epoch_progress,
    log_messages,
    progress_line,
    render,
    state_changes,
)
from orchestrator.contracts_steps import Evaluation
from tests.support.step_results import EVALUATION

EPOCH = "epoch 2/3 train_loss=0.6716 train_acc=0.504 val_loss=0.6175 val_acc=0.533 67 img/s 3.8s eta 0:00:08"


def test_only_changed_states_are_news_in_the_apis_order() -> None:
    before = {"resolve_config": "running", "ci_gate": None, "train": None}
    now = {"resolve_config": "success", "ci_gate": "queued", "train": None}
    assert state_changes(before, now) == [("resolve_config", "success"), ("ci_gate", "queued")]
    assert state_changes(now, now) == []
    # A retried task going back to a state it had before is news again.
    assert state_changes({"train": "up_for_retry"}, {"train": "running"}) == [("train", "running")]


def test_log_messages_of_json_lines_and_of_anything_else() -> None:
    lines = [
        json.dumps({"timestamp": "2026-11-26T16:38:32Z", "level": "info", "event": f"train | {EPOCH}"}) + "\n",
        "plain text line\n",
        '{"event": "cut mid-wri',
        json.dumps({"level": "info", "event": {"not": "text"}}),
    ]
    messages = list(log_messages(lines))
    assert messages[:3] == [f"train | {EPOCH}", "plain text line", '{"event": "cut mid-wri']
    assert messages[3].startswith("{")


def test_epoch_progress_picks_the_training_jobs_epoch_reports() -> None:
    assert epoch_progress(f"train | {EPOCH}") == EPOCH
    assert epoch_progress(EPOCH) == EPOCH
    for other in (
        "train | 2026/11/26 INFO remote.engine: trained 3 epochs in 22.7s; best epoch 3",
        "train | early stopping after epoch 4: no better validation loss for 3 epochs",
        "bootstrap | epoch-less line",
    ):
        assert epoch_progress(other) is None


def test_log_follower_returns_complete_lines_once_across_tries_and_trigger_files(tmp_path: Path) -> None:
    follower = LogFollower(tmp_path / "task_id=train")
    assert follower.new_lines() == []  # the folder appears only when the task starts
    folder = tmp_path / "task_id=train"
    folder.mkdir()
    first = folder / "attempt=1.log"
    first.write_text("one\ntw")
    assert follower.new_lines() == ["one"]
    with first.open("a") as fh:
        fh.write("o\nthree\n")
    (folder / "attempt=1.log.trigger.7.log").write_text("from the triggerer\n")
    assert follower.new_lines() == ["two", "three", "from the triggerer"]
    (folder / "attempt=2.log").write_text("retry\n")
    assert follower.new_lines() == ["retry"]
    assert follower.new_lines() == []


def test_progress_line_is_aligned_on_the_elapsed_seconds() -> None:
    assert progress_line(3.14159, "train running") == "   3.1s  train running"


def test_summary_prints_the_time_outside_training_and_where_to_look(tmp_path: Path) -> None:
    summary = RunSummary(
        dag_run_id="demo__1",
        state="success",
        task_states={"train": "success", "terminate": "success"},
        task_seconds={"train": 20.04, "terminate": 1.5},
        instance_id="i-1",
        instance_type="g6.xlarge",
        instance_states={"i-1": "terminated"},
        mlflow_run_id="abc",
        mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc",
        evaluation=Evaluation.from_xcom(EVALUATION | {"reason": "0.93 passes the threshold"}),
        startup_s=21.0,
        run_s=32.5,
        train_s=20.0,
        notifications={"e-mail": "1 message(s) in the Maildir /m", "Slack": "1 message(s) in /s"},
        cost={
            "usd": 0.013413,
            "billed_s": 60.0,  # a minute at least
            "training_s": 20.0,
            "non_training_s": 40.0,
            "training_share": 0.3333,
            "usd_per_hour": 0.8048,
            "price_source": "fallback-table",
            "region": "us-east-1",
        },
        phases={"launch": 1.04, "bootstrap.python": 4.0, "training": 20.0},
        seconds_to_first_epoch=9.96,
    )
    assert summary.outside_training_s == 12.5
    text = render(
        summary,
        urls={"Airflow": "http://127.0.0.1:8080", "MLflow": "http://127.0.0.1:5000"},
        login=("admin", "s3cret"),
        state_root=tmp_path,
    )
    assert "DAG run      demo__1: SUCCESS" in text
    assert "i-1: terminated" in text
    assert "model gate   promoted to champion: 0.93 passes the threshold" in text
    assert "DAG run 32.5 s: training 20.0 s, outside training 12.5 s (start-up before it 21.0 s)" in text
    assert "train 20.0s, terminate 1.5s" in text
    assert "notified     e-mail: 1 message(s) in the Maildir /m\n             Slack: 1 message(s) in /s" in text
    assert "cost         0.0134 USD: 60 s billed at 0.8048 USD/h (fallback-table); training 33% of it, 40 s not" in text
    assert "phases       launch 1.0s, bootstrap.python 4.0s, training 20.0s\nfirst epoch  10.0s after CI passed" in text
    lines = text.splitlines()
    assert lines[-4:-1] == [
        "  Airflow          http://127.0.0.1:8080",
        "  MLflow           http://127.0.0.1:5000",
        "  login            admin / s3cret",
    ]


def test_summary_of_a_run_that_failed_early() -> None:
    summary = RunSummary(dag_run_id="demo__2", state="failed", task_states={"ci_gate": "failed"}, run_s=4.0)
    text = render(summary, urls={}, login=("admin", "x"), state_root=Path("/state"))
    assert "demo__2: FAILED" in text
    assert "final state  no instance" in text
    assert "model gate" not in text
    assert "cost" not in text and "phases" not in text
    assert "outside training 4.0 s" in text
