"""Scan the dataset layout and decode every image once into one uint8 tensor per split.

Defined behaviour for bad input: a missing required split or class folder, or a class with no readable image, is a
DataError; unreadable files (corrupt JPEGs, non-images) are skipped and counted; images of another size are resized
and counted; grayscale or RGBA images are converted to RGB. The tensors are NCHW in channels_last memory.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from remote.errors import DataError
from remote.layout import CLASS_NAMES, LABELS, OPTIONAL_SPLITS, REQUIRED_SPLITS

log = logging.getLogger(__name__)

_GPU_DECODE_BATCH = 1024  # batched nvjpeg calls; large enough to amortise launch cost


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split, in a fixed order, with their labels."""

    name: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class LoadedSplit:
    """One split decoded: `images` uint8 (N, 3, S, S) channels_last, `labels` float32 (N,) with damage = 1."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    skipped: int
    resized: int

    def class_counts(self) -> dict[str, int]:
        positives = int(self.labels.sum().item())
        return {"damage": positives, "no_damage": int(self.labels.numel()) - positives}


def _class_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def scan_split(root: Path, split: str, max_images: int = 0) -> SplitFiles:
    """List a split's files; `max_images` > 0 keeps that many in all, each class cut in proportion."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split!r} is missing under {root}; expected {', '.join(REQUIRED_SPLITS)}")
    per_class: dict[str, list[Path]] = {}
    for name in CLASS_NAMES:
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(
                f"class folder {split}/{name} is missing under {root}; each split needs damage/ and no_damage/"
            )
        files = _class_files(class_dir)
        if not files:
            raise DataError(f"class folder {split}/{name} is empty under {root}")
        per_class[name] = files
    total = sum(len(files) for files in per_class.values())
    paths: list[Path] = []
    labels: list[int] = []
    for name, files in per_class.items():
        keep = len(files) if max_images <= 0 or max_images >= total else max(1, round(len(files) * max_images / total))
        paths.extend(files[:keep])
        labels.extend([LABELS[name]] * keep)
    return SplitFiles(split, tuple(paths), tuple(labels))


def scan(root: Path, max_images: int = 0) -> dict[str, SplitFiles]:
    """Every required split, and the optional ones that exist."""
    splits = {split: scan_split(root, split, max_images) for split in REQUIRED_SPLITS}
    for split in OPTIONAL_SPLITS:
        if (root / split).is_dir():
            splits[split] = scan_split(root, split, max_images)
    return splits


def _decode_pil(path: Path, size: int) -> tuple[np.ndarray | None, bool]:
    """(HxWx3 uint8 pixels or None if unreadable, whether it was resized)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None, False
    if rgb.size == (size, size):
        return np.asarray(rgb), False
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR)), True


def _decode_cpu(paths: Sequence[Path], size: int, workers: int) -> tuple[torch.Tensor, list[bool], int]:
    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok = [False] * len(paths)
    resized = 0

    def one(index: int) -> tuple[int, np.ndarray | None, bool]:
        return (index, *_decode_pil(paths[index], size))

    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, range(len(paths))))
    else:
        results = [one(index) for index in range(len(paths))]
    for index, array, was_resized in results:
        if array is not None:
            pixels[index] = array
            ok[index] = True
            resized += was_resized
    # NHWC storage viewed as NCHW is exactly the channels_last layout
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), ok, resized


def _read_bytes(path: Path) -> torch.Tensor:
    """The file as a uint8 tensor (torchvision reads without the GIL); empty when unreadable, which nvjpeg rejects."""
    from torchvision.io import read_file

    try:
        return read_file(str(path))
    except RuntimeError:
        return torch.empty(0, dtype=torch.uint8)


def _decode_chunk(
    raw: list[torch.Tensor], paths: list[Path], size: int, device: torch.device
) -> tuple[list[torch.Tensor | None], int]:
    """One batched nvjpeg call: (images, how many PIL resized). If one file fails the batch (a bad file, a PNG),
    one by one, with PIL for what nvjpeg rejects; PIL returns them already at `size`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)), 0
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        resized = 0
        for data, path in zip(raw, paths, strict=True):
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                array, was_resized = _decode_pil(path, size)
                resized += was_resized
                decoded.append(None if array is None else torch.tensor(array).permute(2, 0, 1).to(device))
        return decoded, resized


def _decode_cuda(
    paths: Sequence[Path], size: int, workers: int, device: torch.device
) -> tuple[torch.Tensor, list[bool], int] | None:
    """nvjpeg decode on the GPU through torchvision; None where torchvision is not installed."""
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        log.warning(
            "torchvision is not installed: decoding on the CPU with PIL (~2,000 images/s instead of >10,000 on the GPU)"
        )
        return None
    from torch.nn import functional

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8, device=device).contiguous(
        memory_format=torch.channels_last
    )
    ok = [False] * len(paths)
    resized = 0
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        # reading files is as slow as nvjpeg: the pool reads ahead while the chunk before is decoded
        reads = pool.map(_read_bytes, paths)
        for start in range(0, len(paths), _GPU_DECODE_BATCH):
            chunk = range(start, min(start + _GPU_DECODE_BATCH, len(paths)))
            raw = list(itertools.islice(reads, len(chunk)))
            decoded, resized_by_pil = _decode_chunk(raw, [paths[i] for i in chunk], size, device)
            resized += resized_by_pil
            if all(image is not None and tuple(image.shape) == (3, size, size) for image in decoded):
                # the common case, one copy per chunk: a copy per image costs more than nvjpeg's decode itself
                out[chunk.start : chunk.stop] = torch.stack(decoded)  # type: ignore[arg-type]
                ok[chunk.start : chunk.stop] = [True] * len(chunk)
                continue
            for i, image in zip(chunk, decoded, strict=True):
                if image is None:
                    continue
                if tuple(image.shape[-2:]) != (size, size):
                    scaled = functional.interpolate(
                        image[None].float(), size=(size, size), mode="bilinear", antialias=True
                    )
                    out[i] = scaled[0].round().clamp(0, 255).to(torch.uint8)
                    resized += 1
                else:
                    out[i] = image
                ok[i] = True
    return out, ok, resized


def load_split(files: SplitFiles, size: int, device: torch.device, workers: int = 4) -> LoadedSplit:
    """Decode a split onto `device` (GPU decode on CUDA where torchvision is available, else PIL)."""
    result = _decode_cuda(files.paths, size, workers, device) if device.type == "cuda" else None
    if result is None:
        images, ok, resized = _decode_cpu(files.paths, size, workers)
        images = images.to(device)
    else:
        images, ok, resized = result
    log.info("%s: decoded %d files with %s", files.name, len(ok), "nvjpeg (GPU)" if result else "PIL (CPU)")
    keep = torch.tensor(ok, dtype=torch.bool)
    labels = torch.tensor(files.labels, dtype=torch.float32)[keep]
    skipped = len(ok) - int(keep.sum().item())
    if skipped:
        images = images[keep.to(images.device)].contiguous(memory_format=torch.channels_last)
    for label, name in enumerate(CLASS_NAMES):
        if not bool((labels == label).any()):
            raise DataError(
                f"split {files.name!r} has no readable {name} image; check the files in {files.name}/{name}"
            )
    return LoadedSplit(files.name, images, labels.to(device), skipped, resized)
