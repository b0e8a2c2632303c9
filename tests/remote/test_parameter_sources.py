"""The job's parameters against their one declaration (dags/orchestrator/run_params.py) and against MLproject.

The job runs from the trained commit on the instance, where the orchestrator's modules are not importable, so it
keeps its own parsers (remote/config.py); these tests fail as soon as they, or MLproject, drift from the source.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml

from orchestrator.config.run_params import BY_NAME, DAG_PARAMS, JOB_PARAMS, MODELS
from orchestrator.config.settings import CheckpointSettings
from remote import config
from remote.errors import ParameterError

REPO = Path(__file__).resolve().parents[2]
NUMERIC = [name for name in JOB_PARAMS if BY_NAME[name].schema["type"] in ("integer", "number")]


def _accepts(name: str, value: object) -> bool:
    parse = config.PARAMETERS[name][0]
    try:
        parse(str(value))
    except ParameterError:
        return False
    return True


@pytest.mark.parametrize("name", NUMERIC)
def test_the_job_has_the_bounds_of_the_trigger_form(name: str) -> None:
    schema = BY_NAME[name].schema
    step = 1 if schema["type"] == "integer" else 1e-9
    if "minimum" in schema:
        assert _accepts(name, schema["minimum"]) and not _accepts(name, schema["minimum"] - step)
    if "exclusiveMinimum" in schema:
        assert not _accepts(name, schema["exclusiveMinimum"]) and _accepts(name, schema["exclusiveMinimum"] + step)
    assert _accepts(name, schema["maximum"]) and not _accepts(name, schema["maximum"] + step)


def test_the_job_knows_the_same_models() -> None:
    assert typing.get_args(config.ModelName) == MODELS == tuple(BY_NAME["model"].schema["enum"])
    assert all(_accepts("model", model) for model in MODELS)


def test_every_knob_the_dag_passes_is_a_job_parameter() -> None:
    assert set(config.PARAMETERS) >= DAG_PARAMS


def test_the_checkpoint_settings_accept_what_the_job_accepts() -> None:
    minutes = CheckpointSettings.model_fields["minutes"].metadata
    bounds = [getattr(m, key) for m in minutes for key in ("ge", "le") if hasattr(m, key)]
    assert all(_accepts("checkpoint_minutes", bound) for bound in bounds)
    assert not _accepts("checkpoint_minutes", bounds[0] - 1e-9) and not _accepts("checkpoint_minutes", bounds[1] + 1e-9)
    assert str(CheckpointSettings().minutes).removesuffix(".0") == config.PARAMETERS["checkpoint_minutes"][1]
    for uri in ("s3://bucket/checkpoints/", "s3://bucket", "/mnt/ckpt", "file:///mnt/ckpt/"):
        assert CheckpointSettings(uri=uri).uri == uri and _accepts("checkpoint_uri", uri)


def test_mlproject_declares_what_the_job_parses_with_its_defaults() -> None:
    main = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]
    declared = main["parameters"]
    assert list(declared) == list(config.PARAMETERS)
    for name, (_, default) in config.PARAMETERS.items():
        # data_uri's MLproject default is what a bare `mlflow run .` trains on; the job itself requires one.
        expected = "synthetic://" if name == "data_uri" else default
        assert str(declared[name]["default"]) == expected, name
    passed = re.findall(r"--(\w+) \{(\w+)\}", main["command"])
    assert passed == [(name, name) for name in config.PARAMETERS]


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_the_range_in_words_names_the_schemas_bounds(name: str) -> None:
    """The form's and the settings' messages say the range in words: they must say the schema's numbers."""
    param = BY_NAME[name]
    bounds = [
        param.schema[key] for key in ("minimum", "maximum", "exclusiveMinimum", "maxItems") if key in param.schema
    ]
    for bound in bounds:
        assert re.search(rf"(?<![\d.]){re.escape(str(bound))}(?![\d])", param.range_text), (bound, param.range_text)
