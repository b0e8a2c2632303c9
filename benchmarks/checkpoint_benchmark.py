"""Checkpoint overhead benchmark (spot recovery): what a checkpoint at every epoch's end costs, and what resuming costs.

    python -m benchmarks.checkpoint_benchmark --images 256 --val-images 64 --epochs 4 --batch-size 32 --device cpu \\
        --workers 2                                                                    # on 2 CPUs, ~1 minute
    python -m benchmarks.checkpoint_benchmark --images 10000 --epochs 10 --device cuda     # on the GPU instance

Trains the default network at the default image size (128) on the job's synthetic data, through the job's own code
(`remote.engine.fit` with `remote.checkpoints.Checkpointer` at `checkpoint_minutes=0`, i.e. every epoch), once without
checkpoints and once per store: a local folder (`LocalStore`) and S3 (`S3Store` on moto in this process, so botocore's
request path without a network). Then a fresh fit restores the last checkpoint, as a relaunched instance does.

Prints the median epoch time of the fit without checkpoints; per store, medians over epochs 2..N of one fit: the
seconds of a checkpoint (snapshot, encode, write, prune), the epoch's own seconds (training and validation) and the two
together, the checkpoint as a percent of its epoch at every epoch and at the job's default interval
(`checkpoint_minutes=10`); the checkpoint's size, and the seconds to load it at resume. Results go to the log (stdout).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.train_benchmark import add_training_arguments, fit_options, synthetic_splits
from remote import checkpoint_store, checkpoints, dataset, engine
from remote.config import TrainConfig
from remote.models import build_model

log = logging.getLogger("benchmark")

_RUN_ID = "benchmark"
_BUCKET = "checkpoint-benchmark"


def overhead_percent(checkpoint_s: float, epoch_s: float, interval_s: float) -> float:
    """A checkpoint's seconds as a percent of the training time between two checkpoints.

    The Checkpointer writes at the end of the first epoch that ends `interval_s` or more after the last write, so
    checkpoints are a whole number of epochs apart, at least one.
    """
    epochs_apart = max(1, math.ceil(interval_s / epoch_s))
    return 100 * checkpoint_s / (epochs_apart * epoch_s)


class TimedCheckpoints:
    """The job's Checkpointer, timing each restore and each epoch end (engine.Checkpoints)."""

    def __init__(self, inner: checkpoints.Checkpointer) -> None:
        self.inner = inner
        self.restore_s: list[float] = []
        self.epoch_done_s: list[float] = []

    def restore(self, loop: engine.Loop) -> None:
        _timed(self.restore_s, self.inner.restore, loop)

    def epoch_done(self, loop: engine.Loop, final: bool) -> None:
        _timed(self.epoch_done_s, self.inner.epoch_done, loop, final)

    def between_batches(self) -> None:
        self.inner.between_batches()


def _timed(record: list[float], call: Callable[..., None], *args: Any) -> None:
    started = time.perf_counter()
    call(*args)
    record.append(time.perf_counter() - started)


@contextmanager
def _stores(names: list[str], folder: Path) -> Iterator[dict[str, checkpoint_store.Store]]:
    """One run's store per name, opened by `open_store` as the job opens them; S3 is moto's, in this process."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")  # moto provides fake credentials
        client.create_bucket(Bucket=_BUCKET)
        uris = {"file": str(folder), "s3": f"s3://{_BUCKET}/checkpoints/"}
        yield {name: checkpoint_store.open_store(uris[name], _RUN_ID, client) for name in names}


def _fit(
    config: TrainConfig,
    train: dataset.LoadedSplit,
    val: dataset.LoadedSplit,
    options: engine.FitOptions,
    timed: TimedCheckpoints | None,
) -> engine.FitResult:
    engine.seed_everything(options.seed)
    model = engine.prepare_model(build_model(config), options.device)
    return engine.fit(model, (train.images, train.labels), (val.images, val.labels), options, checkpoints=timed)


def _checkpointed(store: checkpoint_store.Store) -> TimedCheckpoints:
    """Every epoch (checkpoint_minutes=0); the MLflow tags go nowhere."""
    return TimedCheckpoints(checkpoints.Checkpointer(store, 0.0, lambda key, value: None))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, epochs=10)
    parser.add_argument("--val-images", type=int, default=1_000, help="validation images (half per class)")
    parser.add_argument("--stores", nargs="+", default=["file", "s3"], choices=("file", "s3"))
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is left out of the medians")
    device = engine.resolve_device(args.device)
    config = TrainConfig(data_uri="synthetic://")  # the job's defaults: the default network at 128 px
    size = config.image_size
    files, val_files = synthetic_splits(args.images, args.val_images, Path(args.cache_dir))
    train, val = (dataset.load_split(split, size, device, args.workers) for split in (files, val_files))
    options = fit_options(args, device)
    log.info(
        "device %s, %d training images of %dpx, %d epochs per fit, batch %d, compile %s",
        engine.device_name(device),
        len(files.paths),
        size,
        args.epochs,
        args.batch_size,
        options.compile,
    )
    # the first epoch pays for compilation and autotuning where there are any
    epoch_s = statistics.median(result.seconds for result in _fit(config, train, val, options, None).history[1:])
    interval_s = config.checkpoint_minutes * 60
    log.info("no checkpoints: %.2f s per epoch (median of epochs 2-%d)", epoch_s, args.epochs)
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="checkpoint-benchmark-") as folder,
        _stores(args.stores, Path(folder)) as stores,
    ):
        for name, store in stores.items():
            timed = _checkpointed(store)
            history = _fit(config, train, val, options, timed).history
            resumed = _checkpointed(store)
            _fit(config, train, val, options, resumed)
            if timed.inner.store is None or resumed.inner.resumed_from != args.epochs:
                log.error("%s: a checkpoint failed or was not resumed (see the warnings above)", name)
                failed = True
                continue
            state = f"{checkpoints.checkpoint_name(args.epochs)}/{checkpoints.STATE_FILE}"
            # each epoch against its own checkpoint: the machine's load moves both alike, unlike two fits in a row
            pairs = list(zip((result.seconds for result in history[1:]), timed.epoch_done_s[1:], strict=True))
            fit_epoch_s = statistics.median(epoch for epoch, _ in pairs)
            write_s = statistics.median(checkpoint for _, checkpoint in pairs)
            log.info(
                "%s store: checkpoint %.3f s, %.1f MB | epoch %.2f s, %.2f s with it | overhead %.2f%% of the epoch "
                "at every epoch, %.4f%% at checkpoint_minutes=%g | load at resume %.3f s (medians of epochs 2-%d)",
                name,
                write_s,
                len(store.get(state)) / 1e6,
                fit_epoch_s,
                statistics.median(epoch + checkpoint for epoch, checkpoint in pairs),
                statistics.median(overhead_percent(checkpoint, epoch, 0) for epoch, checkpoint in pairs),
                overhead_percent(write_s, fit_epoch_s, interval_s),
                interval_s / 60,
                resumed.restore_s[0],
                args.epochs,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
