"""End to end: `mlflow run . --env-manager local` against a real local MLflow server, then the job's exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedded.services.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA = "synthetic://?train_per_class=40&val_per_class=10&test_per_class=10&test_another_damage=8&test_another_no_damage=2&size=64"


@pytest.fixture(scope="module")
def tracking_uri(mlflow_server: MlflowServer) -> str:
    return mlflow_server.url


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project files `mlflow run` needs, outside git, so MLflow does not touch the working tree's repository."""
    target = tmp_path_factory.mktemp("project")
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(REPO / name, target / name)
    shutil.copytree(REPO / "remote", target / "remote", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _env(tracking_uri: str, cache: Path) -> dict[str, str]:
    # Only this test's MLflow settings: an experiment or run id left in the environment would redirect the job.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {
        **inherited,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "XDG_CACHE_HOME": str(cache),
        "PYTHONPATH": "",
    }


def test_mlflow_run_logs_everything(tracking_uri, project, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    completed = subprocess.run(
        [
            str(BIN / "mlflow"),
            "run",
            str(project),
            "--env-manager",
            "local",
            "--experiment-name",
            "it",
            "-P",
            "epochs=3",
            "-P",
            "batch_size=8",
            "-P",
            "learning_rate=0.001",
            "-P",
            f"data_uri={DATA}",
            "-P",
            "image_size=64",
            "-P",
            "seed=3",
            "-P",
            "git_sha=abc123",
        ],
        env=_env(tracking_uri, tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    epoch_lines = [line for line in completed.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert "img/s" in epoch_lines[0] and "eta" in epoch_lines[0]

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("it")
    assert experiment is not None
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3"
    assert run.data.params["model"] == "default"
    assert run.data.params["resolved_device"] == "cpu"
    assert run.data.tags["git_sha"] == "abc123"
    assert run.data.tags["device_name"] == "cpu"
    # The reproducible record: the software stack it trained with ("none" for what a CPU machine lacks).
    import torch

    assert run.data.tags["env.torch_version"] == torch.__version__
    assert run.data.tags["env.mlflow_version"] == mlflow.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*|none", run.data.tags["env.torchvision_version"])
    assert run.data.tags["env.cuda_version"] == (torch.version.cuda or "none")
    assert run.data.tags["env.cudnn_version"] == "none" and run.data.tags["env.nvidia_driver_version"] == "none"
    assert run.data.tags["data_uri"] == DATA
    metrics = run.data.metrics
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert 0.0 <= metrics[f"test_{name}"] <= 1.0
        assert f"test_another_{name}" in metrics
    assert metrics["test_accuracy"] >= 0.8  # the synthetic signal is learnable
    # Dataset figures are params under one prefix: no chart of theirs comes before the learning curves.
    assert run.data.params["data/train_another/damage_fraction"] == "0.5"
    assert run.data.params["data/test_another/images"] == "10"
    assert not any(key.startswith("data") for key in metrics)
    assert metrics["decode_images_per_s"] > 0
    # Per-epoch figures under prefixes MLflow's run page charts before its single values.
    history = client.get_metric_history(run.info.run_id, "learning/val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "speed/throughput_images_per_s")) == 3
    assert not {"val_loss", "train_loss", "epoch_time_s"} & set(metrics)
    assert any(key.startswith("system/") for key in metrics)
    assert client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {
        "learning_curves.png",
        "confusion_matrix_test.png",
        "confusion_matrix_test_another.png",
        "metrics.json",
    } <= artifacts
    saved = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))).read_text())
    assert saved["summary"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None
    prediction = np.asarray(model.predict(np.zeros((3, 3, 64, 64), dtype=np.float32)))
    assert prediction.shape == (3, 1)
    assert bool(((prediction >= 0) & (prediction <= 1)).all())


def test_a_run_created_beforehand_gets_every_param_unquoted(tracking_uri, project, tmp_path):
    """As the DAG runs it: the run exists, named and tagged, and `mlflow run --run-id` trains into it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(f"precreated-{tmp_path.name}")
    created = client.create_run(experiment_id, run_name="abc1234 manual__1", tags={"airflow.run_id": "manual__1"})
    # `?` and `&` make a shell-quoted value; an empty value would be logged as ''.
    data = DATA + "&seed=1"
    completed = subprocess.run(
        [
            *(str(BIN / "mlflow"), "run", str(project), "--env-manager", "local"),
            *("--experiment-id", experiment_id, "--run-id", created.info.run_id),
            *("-P", "epochs=1", "-P", "batch_size=8", "-P", f"data_uri={data}", "-P", "image_size=64"),
        ],
        env=_env(tracking_uri, tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    run = client.get_run(created.info.run_id)
    assert run.info.status == "FINISHED"
    assert (run.info.run_name, run.data.tags["airflow.run_id"]) == ("abc1234 manual__1", "manual__1")
    params = run.data.params
    assert (params["data_uri"], params["epochs"]) == (data, "1")
    # The instance's cache path is a tag: as a param, MLflow's compare view charted it.
    assert "cache_dir" not in params
    assert run.data.tags["cache_dir"] == str(tmp_path / "hurricane-damage")
    assert not [value for value in params.values() if value.startswith("'")]
    assert len(client.search_runs([experiment_id])) == 1  # no second run of its own


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--epochs", "two"], 2, "error: epochs must be an integer, got 'two'"),
        (["--data_uri", "/nonexistent/hurricane"], 3, "error: data path /nonexistent/hurricane does not exist"),
    ],
)
def test_exit_codes_and_one_line_errors(tracking_uri, project, tmp_path, args, code, message):
    completed = subprocess.run(
        [sys.executable, "-m", "remote.train", "--data_uri", DATA, *args],
        cwd=project,
        env=_env(tracking_uri, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == code
    assert completed.stderr.strip().splitlines()[-1].startswith(message)
