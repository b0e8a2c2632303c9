from __future__ import annotations

import pytest

from remote.config import as_params, parse_config
from remote.errors import ParameterError


def test_defaults_and_typed_values():
    config = parse_config(
        ["--data_uri", "synthetic://", "--epochs", "3", "--learning_rate", "0.01", "--compile", "TRUE"]
    )
    assert (config.epochs, config.learning_rate, config.compile, config.model) == (3, 0.01, "true", "default")
    assert config.conv_filters == (32, 64, 128, 128)
    assert as_params(config)["conv_filters"] == "32,64,128,128"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "abc"], "epochs must be an integer"),
        (["--epochs", "0"], "epochs must be between 1"),
        (["--learning_rate", "0"], "learning_rate must be in"),
        (["--learning_rate", "nan"], "learning_rate must be in"),
        (["--device", "tpu"], "device must be one of auto, cpu, cuda"),
        (["--precision", "fp16"], "precision must be one of"),
        (["--compile", "maybe"], "compile must be auto, true or false"),
        (["--conv_filters", "32,x"], "conv_filters entries must be an integer"),
        (["--image_size", "20"], "too small for 4 convolution blocks"),
        (["--bogus", "1"], "unknown arguments --bogus"),
        (["--checkpoint_minutes", "-1"], "checkpoint_minutes must be in"),
        (["--checkpoint_minutes", "ten"], "checkpoint_minutes must be a number"),
        (["--checkpoint_minutes", "1441"], "checkpoint_minutes must be in"),
        (["--checkpoint_uri", "gs://bucket/checkpoints"], "checkpoint_uri scheme 'gs' is not supported"),
        (["--checkpoint_uri", "s3://"], "names no valid bucket"),
        (["--checkpoint_uri", "s3://bucket/a/../b"], "unsafe key segment"),
        (["--checkpoint_uri", "s3://bucket/a?versionId=1"], "use a plain s3://bucket/prefix/"),
    ],
)
def test_invalid_values_are_rejected_with_the_fix(argv, message):
    with pytest.raises(ParameterError, match=message):
        parse_config(["--data_uri", "synthetic://", *argv])


def test_data_uri_is_required():
    with pytest.raises(ParameterError, match="data_uri is required"):
        parse_config([])


def test_the_instances_paths_are_no_params():
    """A per-instance path logged as a param was charted by MLflow's compare view; the job tags it instead."""
    config = parse_config(["--data_uri", "synthetic://", "--cache_dir", "/scratch/cache"])
    params = as_params(config)
    assert "cache_dir" not in params
    assert {"data_uri", "epochs", "learning_rate", "git_sha"} <= set(params)


@pytest.mark.parametrize("uri", ["", "s3://bucket/checkpoints/", "s3://bucket", "file:///tmp/ckpt", "ckpt", "C:\\ckpt"])
def test_checkpoint_settings(uri):
    config = parse_config(["--data_uri", "synthetic://", "--checkpoint_uri", uri, "--checkpoint_minutes", "0"])
    assert (config.checkpoint_uri, config.checkpoint_minutes) == (uri, 0.0)
    assert parse_config(["--data_uri", "synthetic://"]).checkpoint_minutes == 10.0
