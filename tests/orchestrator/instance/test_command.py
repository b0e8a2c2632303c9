"""orchestrator.instance.command: the `mlflow run` argv and what MLflow's own output tells about the run."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config.run_params import DAG_PARAMS
from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import PREEMPTIONS_TAG
from orchestrator.contracts_steps import ReadyInstance
from orchestrator.instance.command import (
    TrainingCommand,
    parse_mlflow_run_id,
    settings_digest,
    tracked_run,
    training_command,
)
from orchestrator.instance.job_script import job_key
from tests.support.step_results import READY

SHA = "0123456789abcdef0123456789abcdef01234567"
RUN_ID = "5d2c6e0b9a1f4c3e8b7a6d5c4b3a2f10"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(
        {"epochs": 3, "batch_size": 32, "learning_rate": 0.0005, "model": "seed", "data_uri": "s3://bucket/data/"},
        env={"TRAINER__TRAINING__EXTRA_PARAMS": "max_images=100,image_size=64", "TRAINER__AWS__DEPLOYMENT": "test"},
    )


def test_argv_shape() -> None:
    command = TrainingCommand(
        project_dir="/var/lib/ec2-trainer/jobs/key/source",
        entry_point="main",
        experiment="hurricane-damage",
        params={"z": "1", "a": "2"},
    )
    # No --version: the folder is the commit's tree (MLflow accepts a version only for a git URI).
    assert command.argv() == [
        "mlflow",
        "run",
        "/var/lib/ec2-trainer/jobs/key/source",
        "--entry-point",
        "main",
        "--env-manager",
        "local",
        "--experiment-name",
        "hurricane-damage",
        "-P",
        "a=2",
        "-P",
        "z=1",
    ]


def test_no_params_no_flags() -> None:
    argv = TrainingCommand("/jobs/k/source", "main", "exp").argv()
    assert "-P" not in argv
    assert argv[-2:] == ["--experiment-name", "exp"]


def test_params_come_from_settings_with_extra_params(settings: Settings) -> None:
    command = training_command(settings, SHA, "/jobs/k/source")
    assert command.project_dir == "/jobs/k/source"
    assert command.entry_point == "main"
    assert command.experiment == "hurricane-damage"
    assert dict(command.params) == {
        "epochs": "3",
        "batch_size": "32",
        "learning_rate": "0.0005",
        "model": "seed",
        "data_uri": "s3://bucket/data/",
        "checkpoint_uri": "s3://bucket/checkpoints/",
        "checkpoint_minutes": "10.0",
        "git_sha": SHA,
        "max_images": "100",
        "image_size": "64",
    }
    argv = command.argv()
    flags = [argv[n + 1] for n, arg in enumerate(argv) if arg == "-P"]
    assert flags == sorted(flags)
    assert len(flags) == 10


def test_checkpoints_go_where_the_settings_say(settings: Settings) -> None:
    elsewhere = with_checkpoints(settings, uri="s3://other/runs/ckpt/", minutes=0.0)
    argv = training_command(elsewhere, SHA, "/jobs/k/source").argv()
    flags = [argv[n + 1] for n, arg in enumerate(argv) if arg == "-P"]
    assert {"checkpoint_uri=s3://other/runs/ckpt/", "checkpoint_minutes=0.0"} <= set(flags)


@pytest.mark.parametrize("off", [{"enabled": False}, {"enabled": False, "uri": "s3://other/ckpt/"}])
def test_without_checkpoints_neither_param_is_passed(settings: Settings, off: dict[str, object]) -> None:
    """The job's defaults are off, and a commit from before checkpoints (its job refuses unknown arguments) trains."""
    params = training_command(with_checkpoints(settings, **off), SHA, "/jobs/k/source").params
    assert not {"checkpoint_uri", "checkpoint_minutes"} & set(params)
    synthetic = settings.model_copy(
        update={"training": settings.training.model_copy(update={"data_uri": "synthetic://"})}
    )
    assert "checkpoint_uri" not in training_command(synthetic, SHA, "/jobs/k/source").params


def with_checkpoints(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"checkpoints": settings.checkpoints.model_copy(update=changes)})


def test_extra_params_never_replace_what_the_dag_sets(settings: Settings) -> None:
    # Settings validation refuses these keys; even a Settings built around it cannot record one value and train another.
    sneaky = {name: "sneaky" for name in DAG_PARAMS}
    forced = settings.model_copy(update={"training": settings.training.model_copy(update={"extra_params": sneaky})})
    params = training_command(forced, SHA, "/jobs/k/source").params
    expected = training_command(settings, SHA, "/jobs/k/source").params
    assert params == {name: expected[name] for name in DAG_PARAMS}
    assert "sneaky" not in params.values()
    # Nor do they turn on what the settings turned off.
    off = forced.model_copy(update={"checkpoints": forced.checkpoints.model_copy(update={"enabled": False})})
    assert "sneaky" not in training_command(off, SHA, "/jobs/k/source").params.values()


def test_learning_rate_keeps_full_precision(settings: Settings) -> None:
    tiny = settings.model_copy(update={"training": settings.training.model_copy(update={"learning_rate": 1e-7})})
    assert training_command(tiny, SHA, "/jobs/k/source").params["learning_rate"] == "1e-07"
    assert float(training_command(tiny, SHA, "/jobs/k/source").params["learning_rate"]) == 1e-7


@pytest.mark.parametrize("value", ["a b c", "x; rm -rf /", "$(id)", 'it\'s "quoted"', "a=b=c"])
def test_a_value_stays_one_argv_element(value: str) -> None:
    argv = TrainingCommand("/jobs/k/source", "main", "exp", {"note": value}).argv()
    assert argv[-2:] == ["-P", f"note={value}"]
    assert argv.count("-P") == 1


def test_experiment_with_spaces_stays_one_element() -> None:
    argv = TrainingCommand("/jobs/k/source", "main", "my experiment; id").argv()
    assert argv[argv.index("--experiment-name") + 1] == "my experiment; id"


# What `mlflow run` prints to stderr (merged into the job log), as seen with MLflow 3.17.
RUNNING_LINE = (
    f"2025/01/01 12:00:00 INFO mlflow.projects.backend.local: === Running command 'source /opt/env.sh && "
    f"python -m remote.train --epochs 3' in run with ID '{RUN_ID}' === "
)
SUCCEEDED_LINE = f"2025/01/01 12:05:00 INFO mlflow.projects: === Run (ID '{RUN_ID}') succeeded ==="
FAILED_LINE = f"2025/01/01 12:05:00 ERROR mlflow.cli: === Run (ID '{RUN_ID}') failed ==="


@pytest.mark.parametrize(
    "log_text",
    [
        f"2025/01/01 INFO mlflow.projects.utils: === Fetching project from git://x ===\n{RUNNING_LINE}\nEpoch 1/3\n",
        f"Epoch 3/3\n{SUCCEEDED_LINE}\n",
        f"Traceback ...\n{FAILED_LINE}\n",
        f"{RUNNING_LINE}\n{SUCCEEDED_LINE}\n",
    ],
)
def test_parse_mlflow_run_id(log_text: str) -> None:
    assert parse_mlflow_run_id(log_text) == RUN_ID


def test_running_line_wins_over_a_later_end_line() -> None:
    other = "f" * 32
    text = f"{RUNNING_LINE}\n=== Run (ID '{other}') succeeded ===\n"
    assert parse_mlflow_run_id(text) == RUN_ID


@pytest.mark.parametrize(
    "log_text",
    [
        "",
        "Epoch 1/3 loss 0.5\n",
        "=== Running command 'x' in run with ID 'not-a-run-id' ===",
        f"=== Run (ID '{RUN_ID}') is still going ===",
        f"=== Run (ID '{RUN_ID[:-1]}') succeeded ===",
    ],
)
def test_parse_mlflow_run_id_none(log_text: str) -> None:
    assert parse_mlflow_run_id(log_text) is None


def test_the_job_trains_into_the_run_created_for_it(settings: Settings) -> None:
    argv = training_command(settings, SHA, "/jobs/k/source", RUN_ID).argv()
    assert argv[argv.index("--run-id") + 1] == RUN_ID
    assert "--run-id" not in training_command(settings, SHA, "/jobs/k/source").argv()


def test_the_tracked_run_leads_back_to_airflow_the_instance_and_ci(settings: Settings) -> None:
    ready = ReadyInstance.from_xcom(READY)
    tracked = tracked_run(
        settings,
        ready,
        SHA,
        lead="10:00 manual",
        dag_id="ec2_training",
        run_id="manual__2026-11-26T10:00:00",
        try_number=2,
    )
    assert tracked.name == "10:00 manual · 0123456"
    assert tracked.tags == {
        "airflow.dag_id": "ec2_training",
        "airflow.run_id": "manual__2026-11-26T10:00:00",
        "ec2_trainer.job_key": job_key("ec2_training", "manual__2026-11-26T10:00:00"),
        "airflow.try_number": "2",
        "ec2.instance_id": "i-0abc",
        "ec2.instance_type": "g6.xlarge",
        "ec2.market": "spot",
        "ci.url": f"https://github.com/your-org/ec2-trainer/commit/{SHA}/checks",
        "mlflow.source.git.commit": SHA,
        "mlflow.source.git.repoURL": "https://github.com/your-org/ec2-trainer",
        "mlflow.source.name": "https://github.com/your-org/ec2-trainer",
        "mlflow.source.type": "PROJECT",
        "mlflow.project.entryPoint": "main",
        "ec2_trainer.settings_digest": settings_digest(settings),
    }
    assert tracked.job_key == tracked.tags["ec2_trainer.job_key"]


def test_the_settings_digest_names_the_resolved_settings(settings: Settings) -> None:
    digest = settings_digest(settings)
    assert len(digest) == 64 and digest == settings_digest(Settings.from_dict(settings.to_dict()))
    other = settings.model_copy(update={"training": settings.training.model_copy(update={"epochs": 7})})
    assert settings_digest(other) != digest


def test_a_sweeps_run_is_nested_under_the_sweeps_run_from_its_creation(settings: Settings) -> None:
    ready = ReadyInstance.from_xcom(READY)
    parent = "f" * 32
    nested = tracked_run(
        settings, ready, SHA, lead="set 1", dag_id="ec2_training", run_id="r__set1", try_number=1, parent_run_id=parent
    )
    assert nested.tags["mlflow.parentRunId"] == parent
    alone = tracked_run(settings, ready, SHA, lead="10:00 manual", dag_id="ec2_training", run_id="r", try_number=1)
    assert "mlflow.parentRunId" not in alone.tags


def test_a_run_started_after_wait_ready_recovered_carries_the_interruptions_count(settings: Settings) -> None:
    """Interruptions before the job started (wait_ready's) are on the MLflow run from its creation; train's own
    recoveries raise the tag (instance.recovery.record_preemption)."""
    ready = ReadyInstance.from_xcom(READY)
    common: dict[str, Any] = {"lead": "10:00 manual", "dag_id": "ec2_training", "run_id": "r", "try_number": 1}
    assert tracked_run(settings, ready, SHA, preemptions=1, **common).tags[PREEMPTIONS_TAG] == "1"
    assert PREEMPTIONS_TAG not in tracked_run(settings, ready, SHA, **common).tags


KILLED_9 = "epoch 3\n=== training process killed by signal 9 ===\n=== Run (ID 'x') failed ===\n"
OOM = "[  12.3] oom-kill:constraint=CONSTRAINT_NONE\n[  12.4] Out of memory: Killed process 4242 (python) total-vm:9G\n"


@pytest.mark.parametrize(
    ("log", "kernel", "expected"),
    [
        ("Traceback\nValueError\n", OOM, "exited with code 1"),
        (
            KILLED_9,
            OOM,
            "exited with code 1: the training process was killed by SIGKILL (9), out of memory? The "
            "kernel logged: [  12.4] Out of memory: Killed process 4242 (python) total-vm:9G",
        ),
        (
            KILLED_9,
            "nothing of note",
            "exited with code 1: the training process was killed by SIGKILL (9), out of "
            "memory? (no OOM line in the kernel log the instance let us read)",
        ),
        (
            "=== training process killed by signal 15 ===\n",
            OOM,
            "exited with code 1: the training process was killed by SIGTERM (15)",
        ),
        (
            "=== training process killed by signal 99 ===\n",
            "",
            "exited with code 1: the training process was killed by signal 99 (99)",
        ),
    ],
)
def test_the_exit_names_the_signal_and_an_oom_kill(log: str, kernel: str, expected: str) -> None:
    from orchestrator.instance.command import exit_description

    assert exit_description(1, log, kernel) == expected


@pytest.mark.parametrize(("script", "code", "marker"), [("kill -9 $$", 137, "signal 9"), ("exit 3", 3, None)])
def test_the_job_wrapper_reports_the_signal_that_killed_the_training(script: str, code: int, marker: str) -> None:
    import subprocess
    from pathlib import Path

    wrapper = Path(__file__).resolve().parents[3] / "remote" / "report_signal.sh"
    done = subprocess.run(
        ["bash", str(wrapper), "sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == code
    if marker:
        assert done.stderr.endswith(f"\n=== training process killed by {marker} ===\n")
    else:
        assert "killed" not in done.stderr
