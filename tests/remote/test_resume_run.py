"""The job stopped after an epoch and started again in the same MLflow run (MLFLOW_RUN_ID, as `mlflow run --run-id`
does) continues from its checkpoint: every epoch step logged once, the whole history in metrics.json, the resume
tagged, and the same test scores as a run that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedded.services.mlflow_server import MlflowServer
from remote import checkpoints, train
from remote.config import parse_config

DATA = "synthetic://?train_per_class=16&val_per_class=4&test_per_class=4&test_another_damage=4&test_another_no_damage=2&size=32"


class Interrupted(Exception):
    """Stands for the instance going away."""


def test_a_run_stopped_after_epoch_3_was_logged_resumes_from_its_checkpoint(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"resume-{tmp_path.name}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", train.checkpoints.REQUEST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_server.url)
    knobs = ["--data_uri", DATA, "--epochs", "4", "--batch_size", "8", "--image_size", "32", "--seed", "3"]
    knobs += ["--conv_filters", "8,16", "--dense_units", "16", "--workers", "0", "--checkpoint_minutes", "0"]

    whole = train.run(parse_config([*knobs, "--checkpoint_uri", str(tmp_path / "whole")]))

    # Epoch 3's metrics are logged, then the instance goes before epoch 3's checkpoint: the resumed job trains
    # epoch 3 again from epoch 2's checkpoint, and must not log its step twice.
    log_metrics = mlflow.log_metrics

    def log_then_stop(metrics: dict[str, float], step: int | None = None, **kwargs: object) -> None:
        log_metrics(metrics, step=step, **kwargs)  # type: ignore[arg-type]
        if step == 3:
            raise Interrupted

    config = parse_config([*knobs, "--checkpoint_uri", str(tmp_path / "checkpoints")])
    with monkeypatch.context() as stopping:
        stopping.setattr(mlflow, "log_metrics", log_then_stop)
        with pytest.raises(Interrupted):
            train.run(config)
    (first,) = [r for r in client.search_runs([experiment_id]) if r.info.status == "FAILED"]
    run_id = first.info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)

    resumed = train.run(config)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[checkpoints.TAG_RESUMED_FROM] == "2"
    assert run.data.tags[checkpoints.TAG_RESUMES] == "1"
    for name in ("learning/val_loss", "learning/train_loss", "speed/epoch_time_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2, 3, 4], name
    saved = json.loads(Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path))).read_text())
    assert [epoch["epoch"] for epoch in saved["history"]] == [1, 2, 3, 4]
    assert "learning_curves.png" in {item.path for item in client.list_artifacts(run_id)}
    scores = {key: value for key, value in resumed.items() if key.startswith("test_") or key == "best_epoch"}
    assert scores == {key: whole[key] for key in scores}
    assert sorted(path.name for path in (tmp_path / "checkpoints" / run_id).iterdir()) == ["ckpt-000003", "ckpt-000004"]
