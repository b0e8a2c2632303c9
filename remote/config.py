"""The job's parameters: parsed from the command line and validated into a frozen dataclass.

MLproject does not enforce parameter types (`-P epochs=abc` reaches the script), so every value is checked here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from remote.checkpoint_store import validate_uri
from remote.errors import ParameterError

ModelName = Literal["default", "seed"]
DeviceName = Literal["auto", "cpu", "cuda"]
PrecisionName = Literal["auto", "fp32", "bf16"]
CompileName = Literal["auto", "true", "false"]


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run, validated."""

    data_uri: str
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    model: ModelName = "default"
    conv_filters: tuple[int, ...] = (32, 64, 128, 128)
    dense_units: int = 512
    dropout: float = 0.5
    seed: int = 0
    device: DeviceName = "auto"
    precision: PrecisionName = "auto"
    image_size: int = 128
    workers: int = 4
    max_images: int = 0
    early_stopping_patience: int = 0
    compile: CompileName = "auto"
    augment: bool = True
    cache_dir: str = ""
    checkpoint_uri: str = ""
    checkpoint_minutes: float = 10.0
    git_sha: str = ""


def _int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ParameterError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ParameterError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def _float(name: str, low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ParameterError(f"{name} must be a number, got {raw!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or value > high or math.isnan(value):
            bound = "(" if low_open else "["
            raise ParameterError(f"{name} must be in {bound}{low}, {high}], got {raw}")
        return value

    return parse


def _choice(name: str, choices: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ParameterError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in {"true", "1", "yes"}:
            return True
        if value in {"false", "0", "no"}:
            return False
        raise ParameterError(f"{name} must be true or false, got {raw!r}")

    return parse


def _compile(raw: str) -> str:
    """`auto` (compile on CUDA only, where it pays for its compile time), or a yes/no that forces it."""
    value = raw.strip().lower()
    if value == "auto":
        return value
    try:
        return str(_bool("compile")(value)).lower()
    except ParameterError:
        raise ParameterError(f"compile must be auto, true or false, got {raw!r}") from None


def _filters(raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.replace(" ", ",").split(",") if part.strip()]
    parse = _int("conv_filters entries", 1, 4096)
    filters = tuple(parse(part) for part in parts)
    if not 1 <= len(filters) <= 6:
        raise ParameterError(f"conv_filters must list 1 to 6 comma-separated widths, got {raw!r}")
    return filters


# name -> (parser, default as the command line would spell it)
PARAMETERS: dict[str, tuple[Callable[[str], object], str]] = {
    "data_uri": (str, ""),
    "epochs": (_int("epochs", 1, 10_000), "10"),
    "batch_size": (_int("batch_size", 1, 65_536), "64"),
    "learning_rate": (_float("learning_rate", 0.0, 1.0, low_open=True), "0.001"),
    "model": (_choice("model", ("default", "seed")), "default"),
    "conv_filters": (_filters, "32,64,128,128"),
    "dense_units": (_int("dense_units", 1, 65_536), "512"),
    "dropout": (_float("dropout", 0.0, 0.95), "0.5"),
    "seed": (_int("seed", 0, 2**32 - 1), "0"),
    "device": (_choice("device", ("auto", "cpu", "cuda")), "auto"),
    "precision": (_choice("precision", ("auto", "fp32", "bf16")), "auto"),
    "image_size": (_int("image_size", 16, 1024), "128"),
    "workers": (_int("workers", 0, 256), "4"),
    "max_images": (_int("max_images", 0, 10_000_000), "0"),
    "early_stopping_patience": (_int("early_stopping_patience", 0, 10_000), "0"),
    "compile": (_compile, "auto"),
    "augment": (_bool("augment"), "true"),
    "cache_dir": (str, ""),
    "checkpoint_uri": (validate_uri, ""),
    "checkpoint_minutes": (_float("checkpoint_minutes", 0.0, 1440.0), "10"),
    "git_sha": (str, ""),
}


def feature_side(image_size: int, blocks: int) -> int:
    """The feature map's side after `blocks` valid 3x3 convolutions, each followed by 2x2 max pooling."""
    side = image_size
    for _ in range(blocks):
        side = (side - 2) // 2
    return side


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """Parse `--name value` arguments into a validated TrainConfig; raises ParameterError with the fix."""
    parser = argparse.ArgumentParser(prog="python -m remote.train", add_help=True, allow_abbrev=False)
    for name, (_, default) in PARAMETERS.items():
        parser.add_argument(f"--{name}", dest=name, default=default, type=str)
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise ParameterError(f"unknown arguments {' '.join(unknown)}; valid ones: --{' --'.join(PARAMETERS)}")
    values = {name: parse(getattr(namespace, name)) for name, (parse, _) in PARAMETERS.items()}
    if not str(values["data_uri"]).strip():
        raise ParameterError("data_uri is required: a folder, a .zip, an s3:// uri or synthetic://")
    config = TrainConfig(**values)  # type: ignore[arg-type]
    if config.model == "default" and feature_side(config.image_size, len(config.conv_filters)) < 1:
        raise ParameterError(
            f"image_size {config.image_size} is too small for {len(config.conv_filters)} convolution blocks; "
            "use a larger image_size or fewer conv_filters"
        )
    return config


# Knobs naming a path of the machine the job ran on: recorded as tags (remote.train), since as params MLflow's
# compare view charts them beside the hyperparameters.
INSTANCE_PATHS = frozenset({"cache_dir"})


def as_params(config: TrainConfig) -> dict[str, str]:
    """The config as MLflow params, spelled as on the command line; the instance's paths left out."""
    params = {name: str(getattr(config, name)) for name in PARAMETERS if name not in INSTANCE_PATHS}
    params["conv_filters"] = ",".join(str(width) for width in config.conv_filters)
    params["augment"] = str(config.augment).lower()
    return params
