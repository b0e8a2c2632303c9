"""config.settings' checkpoints section: where the job keeps its checkpoints (beside S3 data unless told), how often,
and the URIs refused before a launch is paid for."""

from __future__ import annotations

import logging

import airflow.sdk  # noqa: F401 - Airflow sets up logging on import: before caplog adds its handler
import pytest

from orchestrator.config.resolve import resolve_config
from orchestrator.config.settings import load_settings
from orchestrator.errors import ConfigError

DEPLOYED = {"TRAINER__AWS__DEPLOYMENT": "test"}


def checkpoint_uri(data_uri: str, **checkpoints: str) -> str:
    env = {**DEPLOYED, **{f"TRAINER__CHECKPOINTS__{key.upper()}": value for key, value in checkpoints.items()}}
    return load_settings({"data_uri": data_uri}, env=env).checkpoint_uri


def test_defaults_keep_them_beside_s3_data_every_ten_minutes() -> None:
    settings = load_settings(env=DEPLOYED)
    assert (settings.checkpoints.enabled, settings.checkpoints.uri, settings.checkpoints.minutes) == (True, "", 10.0)
    assert isinstance(settings.checkpoints.minutes, float)
    assert settings.checkpoint_uri == "s3://your-bucket/checkpoints/"


@pytest.mark.parametrize(
    ("data_uri", "expected"),
    [
        ("s3://data-bucket/hurricane/v3/", "s3://data-bucket/checkpoints/"),
        ("s3://data-bucket/hurricane/data.zip", "s3://data-bucket/checkpoints/"),
        ("s3://data-bucket", "s3://data-bucket/checkpoints/"),
        ("file:///mnt/data/", ""),
        ("/mnt/data", ""),
        ("synthetic://?size=64", ""),
    ],
)
def test_an_empty_uri_means_beside_the_data_when_it_is_on_s3_else_off(data_uri: str, expected: str) -> None:
    assert checkpoint_uri(data_uri) == expected


@pytest.mark.parametrize("uri", ["s3://other-bucket/runs/ckpt/", "s3://other-bucket", "/mnt/ckpt", "file:///mnt/ckpt/"])
def test_an_explicit_uri_wins_wherever_the_data_is(uri: str) -> None:
    assert checkpoint_uri("s3://data-bucket/hurricane/", uri=uri) == uri
    assert checkpoint_uri("synthetic://", uri=uri) == uri


@pytest.mark.parametrize("uri", ["", "s3://other-bucket/ckpt/"])
def test_disabled_means_off_whatever_the_uri(uri: str) -> None:
    assert checkpoint_uri("s3://data-bucket/hurricane/", enabled="false", uri=uri) == ""


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("off", "expected empty (beside the data), s3://bucket/prefix/ or an absolute folder"),
        ("ckpt", "an absolute folder on the instance"),
        ("gs://bucket/ckpt/", "s3://bucket/prefix/"),
        ("synthetic://", "s3://bucket/prefix/"),
        ("file://host/ckpt", "an absolute folder on the instance"),
        ("s3://bucket/a/../b/", "a key prefix without the path segment '..'"),
        ("s3://bucket/a//b/", "a key prefix without the path segment ''"),
        ("s3:///ckpt/", "a valid bucket name"),
        ("s3://bucket/a b/", "without spaces"),
        ("/mnt/a\nb", "without spaces"),
        ("-/ckpt", "an absolute folder"),
    ],
)
def test_a_uri_the_job_would_refuse_is_refused_here(uri: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoints\.uri: ") as refused:
        checkpoint_uri("synthetic://", uri=uri)
    assert problem in str(refused.value)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:very-secret@bucket/ckpt/",
        "s3://very-secret@bucket/ckpt/",
        "s3://bucket/ckpt/?X-Amz-very-secret=1",
    ],
)
def test_credentials_in_the_uri_are_refused_without_being_echoed(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoints\.uri: '<redacted>' is invalid; expected no credentials") as e:
        checkpoint_uri("synthetic://", uri=uri)
    assert "very-secret" not in str(e.value)


@pytest.mark.parametrize(
    ("minutes", "ok"), [("0", True), ("0.5", True), ("1440", True), ("-1", False), ("1441", False)]
)
def test_minutes_have_the_jobs_bounds(minutes: str, ok: bool) -> None:
    env = {**DEPLOYED, "TRAINER__CHECKPOINTS__MINUTES": minutes}
    if ok:
        assert load_settings(env=env).checkpoints.minutes == float(minutes)
    else:
        with pytest.raises(ConfigError, match=r"^checkpoints\.minutes: .* expected a value between 0 and 1440"):
            load_settings(env=env)


def test_the_run_configuration_says_where_they_go(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in DEPLOYED.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="orchestrator.config.resolve"):
        resolve_config({"data_uri": "s3://data-bucket/v1/"})
        resolve_config({"data_uri": "synthetic://"})
    assert "checkpoints s3://data-bucket/checkpoints/ every 10 min" in caplog.text
    assert caplog.text.count("checkpoints off") == 1
