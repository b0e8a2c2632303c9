"""Throughput benchmark: the seed pipeline's settings against the job's own fast path, on the same synthetic data.

    python -m benchmarks.train_benchmark --images 10000 --epochs 30        # on the GPU instance
    python -m benchmarks.train_benchmark --images 1000 --epochs 2 --baseline-images 400 --device cpu

Seed settings: batch 4, fp32, every image decoded with PIL when its batch is drawn. Fast path: the job's own code
(`remote.dataset.load_split` + `remote.engine.fit`): decoded once onto the device, batch 512, bf16, channels_last,
fused Adam, torch.compile. Prints images/s for each and their ratio, for the default and the `seed` network, plus the
decode rate and the wall time of a full training including decode and compile. Results go to the log (stdout).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from remote import dataset, engine, synthetic
from remote.layout import TRAIN_SPLIT, VALIDATION_SPLIT
from remote.models import DamageCNN, SeedNet

log = logging.getLogger("benchmark")

CACHE_DIR = Path(tempfile.gettempdir()) / "hurricane-benchmark"


def synthetic_splits(
    train_images: int, val_images: int, cache_dir: Path
) -> tuple[dataset.SplitFiles, dataset.SplitFiles]:
    """The training and validation files of the job's synthetic data (128x128 JPEGs, half per class), generated
    into `cache_dir` once per size and reused."""
    spec = synthetic.SyntheticSpec(
        train_per_class=train_images // 2,
        val_per_class=val_images // 2,
        test_per_class=1,
        test_another_damage=0,
        test_another_no_damage=0,
    )
    root = synthetic.materialize(spec, cache_dir)
    return dataset.scan_split(root, TRAIN_SPLIT), dataset.scan_split(root, VALIDATION_SPLIT)


def add_training_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The knobs every training benchmark takes: data size, epochs, batch, device, decode workers, compile, cache."""
    parser.add_argument("--images", type=int, default=10_000, help="training images (half per class)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR))


def fit_options(args: argparse.Namespace, device: torch.device) -> engine.FitOptions:
    """The job's fit at the benchmark's knobs: bf16 where the device has it, compile as asked (default: CUDA only)."""
    return engine.FitOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=1e-3,
        device=device,
        bf16=engine.resolve_bf16("auto", device),
        compile=engine.resolve_compile("auto", device) if args.compile is None else args.compile,
        seed=0,
    )


def _baseline(model: torch.nn.Module, files: dataset.SplitFiles, device: torch.device, limit: int) -> float:
    """images/s under the seed's settings: batch 4, fp32, per-image PIL decode, no resident data."""
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(files.paths))[:limit]
    started = time.perf_counter()
    for start in range(0, len(order) - 3, 4):
        batch = order[start : start + 4]
        pixels = np.stack([np.asarray(Image.open(files.paths[i]).convert("RGB")) for i in batch])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().to(device)
        labels = torch.tensor([float(files.labels[i]) for i in batch], device=device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (len(order) // 4 * 4) / (time.perf_counter() - started)


def _fast(
    model: torch.nn.Module,
    files: dataset.SplitFiles,
    val: dataset.SplitFiles,
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[float, float, float]:
    """(steady-state images/s, decode images/s, wall seconds of decode + compile + all epochs) on the job's path."""
    started = time.perf_counter()
    train = dataset.load_split(files, 128, device, args.workers)
    validation = dataset.load_split(val, 128, device, args.workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    decode_rate = (len(files.paths) + len(val.paths)) / (time.perf_counter() - started)
    options = fit_options(args, device)
    result = engine.fit(
        engine.prepare_model(model, device),
        (train.images, train.labels),
        (validation.images, validation.labels),
        options,
    )
    wall = time.perf_counter() - started
    steady = result.history[1:] or result.history  # the first epoch pays for compilation and autotuning
    return float(np.median([r.images_per_s for r in steady])), decode_rate, wall


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, epochs=30)
    parser.add_argument("--baseline-images", type=int, default=4_000, help="images timed under the seed settings")
    args = parser.parse_args(argv)
    device = engine.resolve_device(args.device)
    if args.compile is None:
        args.compile = engine.resolve_compile("auto", device)
    files, val = synthetic_splits(args.images, 1_000, Path(args.cache_dir))
    log.info(
        "device %s, %d training images, %d epochs, batch %d, compile %s",
        engine.device_name(device),
        len(files.paths),
        args.epochs,
        args.batch_size,
        args.compile,
    )
    for name, factory in (("default", lambda: DamageCNN()), ("seed", SeedNet)):
        engine.seed_everything(0)
        slow = _baseline(factory(), files, device, args.baseline_images)
        fast, decode_rate, wall = _fast(factory(), files, val, device, args)
        log.info(
            "%s network: seed settings %.0f images/s | fast path %.0f images/s | ratio %.1fx",
            name,
            slow,
            fast,
            fast / slow,
        )
        log.info(
            "%s network: decode %.0f images/s | full %d-epoch training incl. decode and compile %.1f s",
            name,
            decode_rate,
            args.epochs,
            wall,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
