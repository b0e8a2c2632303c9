"""The job's entry point: `python -m remote.train --data_uri ... --epochs ...` (what MLproject's `main` runs).

Exit codes: 0 success, 2 invalid parameters, 3 unusable data, 1 anything unexpected (with a traceback).
Inside `mlflow run` it logs into the run MLflow created (MLFLOW_RUN_ID); run directly it creates one. With a
`checkpoint_uri`, a run started again (the same MLFLOW_RUN_ID) continues from its latest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from remote import checkpoint_store, checkpoints, dataset, engine, environment, reports, sources
from remote.config import TrainConfig, as_params, parse_config
from remote.errors import TrainingError
from remote.layout import TEST_PREFIXES, TRAIN_SPLIT, VALIDATION_SPLIT
from remote.metrics import LEARNING_SECTION, BinaryMetrics, binary_metrics, epoch_metrics
from remote.models import Probability, build_model
from remote.progress import epoch_line

log = logging.getLogger("remote.train")

_SYSTEM_METRICS_INTERVAL_S = 2.0  # short runs still get samples; long ones are not flooded
DATA_PREFIX = "data/"
_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_MODEL_TRAINING_KIND = "custom_model_development"


def _log_params(config: TrainConfig, extra: dict[str, str]) -> None:
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    # A run `mlflow run` created itself already holds the -P values, shell-quoted where a shell needs it (the DAG
    # creates its runs beforehand so that none are): re-logging a differently spelled value is an error.
    params = {key: value for key, value in {**as_params(config), **extra}.items() if key not in existing}
    mlflow.log_params(params)


def _mark_model_training(experiment_id: str) -> None:
    """MLflow's kind of the experiment ("Machine learning" in its UI's kind selector). The orchestrator tags the
    experiments it creates; this covers the job run on its own (`mlflow run .`) too."""
    import mlflow

    client = mlflow.MlflowClient()
    if client.get_experiment(experiment_id).tags.get(_EXPERIMENT_KIND_TAG) != _MODEL_TRAINING_KIND:
        client.set_experiment_tag(experiment_id, _EXPERIMENT_KIND_TAG, _MODEL_TRAINING_KIND)


def _git_sha(config: TrainConfig) -> str:
    import mlflow

    if config.git_sha:
        return config.git_sha
    run = mlflow.active_run()
    tags = mlflow.get_run(run.info.run_id).data.tags if run else {}
    return tags.get("mlflow.source.git.commit") or os.environ.get("GIT_SHA", "unknown")


def _log_model(model: torch.nn.Module, image_size: int) -> None:
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    served = Probability(model).to("cpu").float().eval()
    example = np.random.default_rng(0).integers(0, 256, (2, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        output = served(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        served,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        code_paths=[str(Path(__file__).resolve().parent)],  # the pickled classes live in the `remote` package
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", f"mlflow=={mlflow.__version__}"],
    )


def _checkpointer(config: TrainConfig, run_id: str) -> checkpoints.Checkpointer:
    import mlflow

    store = checkpoint_store.open_store(config.checkpoint_uri, run_id) if config.checkpoint_uri else None
    if store is not None:
        log.info("checkpoints every %g minutes in %s", config.checkpoint_minutes, sources.redact_uri(store.location))
    resumes = mlflow.get_run(run_id).data.tags.get(checkpoints.TAG_RESUMES, "0")
    return checkpoints.Checkpointer.from_environment(
        store, config.checkpoint_minutes, mlflow.set_tag, int(resumes) if resumes.isdigit() else 0
    )


def _last_logged_epoch(run_id: str) -> int:
    """The last epoch step the run holds: the epochs after a run's last checkpoint were logged before it stopped."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, f"{LEARNING_SECTION}val_loss")
    return max((metric.step for metric in history), default=0)


def _evaluate_split(model: torch.nn.Module, split: dataset.LoadedSplit, options: engine.FitOptions) -> BinaryMetrics:
    _, probabilities = engine.evaluate(model, split.images, split.labels, options)
    labels = [int(label) for label in split.labels.tolist()]
    return binary_metrics(labels, probabilities.float().cpu().tolist())


def _load_data(config: TrainConfig, device: torch.device) -> tuple[dict[str, dataset.LoadedSplit], dict[str, float]]:
    """Read and decode every split onto the device; log what was read. Returns the splits and the figures."""
    import mlflow

    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else sources.default_cache_dir()
    root = sources.resolve(config.data_uri, cache_dir)
    started = time.perf_counter()
    loaded = {
        name: dataset.load_split(files, config.image_size, device, config.workers)
        for name, files in dataset.scan(root, config.max_images).items()
    }
    decode_s = time.perf_counter() - started
    mlflow.set_tag("cache_dir", str(cache_dir))  # the instance's own path, where the data was read from
    total_images = sum(split.labels.numel() for split in loaded.values())
    # What the job was given, per split, as params under one prefix: one group in the run's parameter table.
    # As metrics they were ~26 single-value charts, and MLflow's UI puts a prefixed section before the
    # learning curves. Decoding is measured, so it stays a metric.
    data_figures: dict[str, float] = {}
    for name, split in loaded.items():
        counts = split.class_counts()
        log.info(
            "%s: %d damage, %d no_damage, %d skipped, %d resized",
            name,
            counts["damage"],
            counts["no_damage"],
            split.skipped,
            split.resized,
        )
        data_figures |= {
            f"{DATA_PREFIX}{name}/images": split.labels.numel(),
            f"{DATA_PREFIX}{name}/damage": counts["damage"],
            f"{DATA_PREFIX}{name}/no_damage": counts["no_damage"],
            f"{DATA_PREFIX}{name}/damage_fraction": counts["damage"] / split.labels.numel(),
            f"{DATA_PREFIX}{name}/skipped": split.skipped,
            f"{DATA_PREFIX}{name}/resized": split.resized,
        }
    mlflow.log_params({key: str(value) for key, value in data_figures.items()})
    decode_metrics = {"decode_time_s": decode_s, "decode_images_per_s": total_images / decode_s}
    mlflow.log_metrics(decode_metrics)
    log.info("decoded %d images in %.1fs (%.0f images/s)", total_images, decode_s, total_images / decode_s)
    return loaded, data_figures | decode_metrics


def run(config: TrainConfig) -> dict[str, float]:
    """Train, evaluate and log one run; returns the test metrics."""
    import mlflow

    device = engine.resolve_device(config.device)
    bf16 = engine.resolve_bf16(config.precision, device)
    compiled = engine.resolve_compile(config.compile, device)
    engine.seed_everything(config.seed)
    mlflow.set_system_metrics_sampling_interval(_SYSTEM_METRICS_INTERVAL_S)
    with mlflow.start_run(log_system_metrics=True) as active, tempfile.TemporaryDirectory() as scratch:
        log.info("mlflow run %s on %s (%s)", active.info.run_id, engine.device_name(device), "bf16" if bf16 else "fp32")
        _mark_model_training(active.info.experiment_id)
        safe_uri = sources.redact_uri(config.data_uri)
        mlflow.set_tags(
            {
                "git_sha": _git_sha(config),
                "device_name": engine.device_name(device),
                "data_uri": safe_uri,
                "model_name": config.model,
                **environment.environment_tags(),
            }
        )
        _log_params(
            config,
            {
                "resolved_device": device.type,
                "resolved_precision": "bf16" if bf16 else "fp32",
                "resolved_compile": str(compiled).lower(),
            },
        )
        loaded, data_figures = _load_data(config, device)

        options = engine.FitOptions(
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            device=device,
            bf16=bf16,
            compile=compiled,
            early_stopping_patience=config.early_stopping_patience,
            augment=config.augment,
            seed=config.seed,
        )
        model = engine.prepare_model(build_model(config), device)
        checkpointer = _checkpointer(config, active.info.run_id)
        logged = _last_logged_epoch(active.info.run_id)
        fit_started = time.perf_counter()

        def on_epoch(result: engine.EpochResult) -> None:
            sys.stdout.write(epoch_line(result, config.epochs, time.perf_counter() - fit_started) + "\n")
            sys.stdout.flush()
            # A resumed run repeats the epochs after its last checkpoint: their steps are logged already, and MLflow
            # would show each twice. (On a CPU the repeat is bit-identical; on a GPU cuDNN may differ in the last bits.)
            if result.epoch > logged or not checkpointer.resumed_from:
                mlflow.log_metrics(epoch_metrics(result), step=result.epoch)

        fitted = engine.fit(
            model,
            (loaded[TRAIN_SPLIT].images, loaded[TRAIN_SPLIT].labels),
            (loaded[VALIDATION_SPLIT].images, loaded[VALIDATION_SPLIT].labels),
            options,
            on_epoch,
            checkpointer,
        )
        summary: dict[str, float] = {
            "best_epoch": fitted.best_epoch,
            "epochs_run": len(fitted.history),
            "stopped_early": float(fitted.stopped_early),
            "train_time_s": time.perf_counter() - fit_started,
            "train_images_per_s": fitted.images_per_s,
        }
        results: dict[str, object] = {"data": data_figures}
        for name, prefix in TEST_PREFIXES.items():
            if name in loaded:
                scores = _evaluate_split(model, loaded[name], options)
                summary |= scores.scalars(prefix)
                results[name] = asdict(scores)
                log.info("%s: %s", name, " ".join(f"{k}={v:.4f}" for k, v in scores.scalars(prefix).items()))
                mlflow.log_artifact(
                    str(reports.confusion_matrix(scores, name, Path(scratch) / f"confusion_matrix_{name}.png"))
                )
        mlflow.log_metrics(summary)
        results["summary"] = summary
        results["history"] = [asdict(result) for result in fitted.history]
        mlflow.log_artifact(
            str(reports.learning_curves(fitted.history, fitted.best_epoch, Path(scratch) / "learning_curves.png"))
        )
        metrics_path = Path(scratch) / "metrics.json"
        metrics_path.write_text(json.dumps(results, indent=2, default=float))
        mlflow.log_artifact(str(metrics_path))
        _log_model(model, config.image_size)
        return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the process exit code."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(parse_config(sys.argv[1:] if argv is None else argv))
    except TrainingError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
