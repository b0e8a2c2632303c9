"""A generated stand-in for the hurricane dataset: the real folder layout, JPEG files, a learnable signal.

Damage images carry brown flood water over part of the scene; no-damage images keep green ground. Both get random
roofs and noise, so a network must look at colour and texture, and accuracy climbs over a few epochs.
Generation is deterministic given the options (one RNG stream per image).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image

from remote.errors import ParameterError
from remote.layout import CLASS_NAMES, TEST_SPLIT, TRAIN_SPLIT, UNBALANCED_TEST_SPLIT, VALIDATION_SPLIT

_READY_MARKER = ".complete"


@dataclass(frozen=True)
class SyntheticSpec:
    """What `synthetic://?key=value&...` asks for; every key is optional."""

    train_per_class: int = 100
    val_per_class: int = 25
    test_per_class: int = 25
    test_another_damage: int = 40
    test_another_no_damage: int = 5
    size: int = 128
    seed: int = 0
    quality: int = 90

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        balanced = {
            TRAIN_SPLIT: self.train_per_class,
            VALIDATION_SPLIT: self.val_per_class,
            TEST_SPLIT: self.test_per_class,
        }
        counts = {split: dict.fromkeys(CLASS_NAMES, n) for split, n in balanced.items()}
        if self.test_another_damage or self.test_another_no_damage:
            counts[UNBALANCED_TEST_SPLIT] = {
                "damage": self.test_another_damage,
                "no_damage": self.test_another_no_damage,
            }
        return counts

    def key(self) -> str:
        """A short digest naming this spec's cache folder."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


_LIMITS: dict[str, tuple[int, int]] = {
    "train_per_class": (1, 1_000_000),
    "val_per_class": (1, 1_000_000),
    "test_per_class": (1, 1_000_000),
    "test_another_damage": (0, 1_000_000),
    "test_another_no_damage": (0, 1_000_000),
    "size": (16, 1024),
    "seed": (0, 2**32 - 1),
    "quality": (1, 100),
}


def parse_synthetic_uri(uri: str) -> SyntheticSpec:
    """`synthetic://?train_per_class=100&seed=0` -> SyntheticSpec; unknown keys and bad values are errors."""
    parts = urlsplit(uri)
    if parts.scheme != "synthetic" or parts.path.strip("/") or parts.netloc:
        raise ParameterError(f"synthetic data uri must look like synthetic://?train_per_class=100&seed=0, got {uri!r}")
    values: dict[str, int] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _LIMITS:
            raise ParameterError(f"unknown synthetic option {key!r}; valid ones: {', '.join(_LIMITS)}")
        low, high = _LIMITS[key]
        try:
            value = int(raw)
        except ValueError:
            raise ParameterError(f"synthetic option {key} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ParameterError(f"synthetic option {key} must be between {low} and {high}, got {value}")
        values[key] = value
    return SyntheticSpec(**values)


def render_image(rng: np.random.Generator, size: int, damaged: bool) -> np.ndarray:
    """One HxWx3 uint8 scene; pure given the RNG state."""
    # smooth ground texture: low-resolution noise upsampled
    coarse = rng.normal(0.0, 1.0, (8, 8, 3)).astype(np.float32)
    ground = np.asarray(
        Image.fromarray(((coarse * 20) + 128).clip(0, 255).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    base = np.array([70, 110, 60], dtype=np.float32)  # vegetation
    scene = base + (ground - 128) * 0.8
    for _ in range(int(rng.integers(1, 5))):  # roofs
        side = int(rng.integers(size // 10, size // 4))
        top, left = rng.integers(0, size - side, 2)
        scene[top : top + side, left : left + side] = rng.uniform(150, 220) + rng.normal(0, 6, 3)
    if damaged:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        cy, cx = rng.uniform(0.2, 0.8, 2)
        radius = rng.uniform(0.35, 0.6)
        water = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
        flood = np.array([125, 100, 65], dtype=np.float32) + (ground - 128) * 0.3
        scene[water] = 0.35 * scene[water] + 0.65 * flood[water]
    scene += rng.normal(0.0, 8.0, scene.shape)
    return scene.clip(0, 255).astype(np.uint8)


def generate(spec: SyntheticSpec, root: Path) -> None:
    """Write the dataset under `root` in the real layout."""
    for split_index, (split, per_class) in enumerate(spec.counts().items()):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class[name]):
                rng = np.random.default_rng([spec.seed, split_index, label, index])
                pixels = render_image(rng, spec.size, damaged=name == "damage")
                Image.fromarray(pixels).save(folder / f"{name}_{index:06d}.jpeg", quality=spec.quality)


def materialize(spec: SyntheticSpec, cache_dir: Path) -> Path:
    """The dataset's folder, generated into the cache once (atomically) and reused afterwards."""
    target = cache_dir / "synthetic" / spec.key()
    if (target / _READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        generate(spec, staging)
        (staging / _READY_MARKER).write_text(json.dumps(asdict(spec)))
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / _READY_MARKER).exists():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
