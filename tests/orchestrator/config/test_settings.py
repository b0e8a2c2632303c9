"""config.settings: layering (defaults < file < environment < params), coercion and every validation rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.ci.github_protocol import html_base_url
from orchestrator.config.run_params import MAX_INSTANCE_TYPES
from orchestrator.config.settings import (
    PARAM_FIELDS,
    Settings,
    load_settings,
    validate,
    validate_data_uri,
    validate_git_ref,
)
from orchestrator.errors import ConfigError

SHA = "0123456789abcdef0123456789abcdef01234567"
# aws.deployment has no default: every environment that should load names one.
DEPLOYED = {"TRAINER__AWS__DEPLOYMENT": "test"}


def with_changes(settings: Settings, section: str, **changes: Any) -> Settings:
    """A copy with changed values and no validation (as a hand-built settings object could be): validate() checks."""
    return settings.model_copy(update={section: getattr(settings, section).model_copy(update=changes)})


@pytest.fixture(scope="module")
def defaults() -> Settings:
    return load_settings(env=DEPLOYED)


def write_toml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "trainer.toml"
    path.write_text(text)
    return {"TRAINER_CONFIG": str(path), **DEPLOYED}


# ---- defaults and layering


def test_defaults_load_and_validate(defaults: Settings) -> None:
    validate(defaults)
    assert defaults.aws.instance_types == ("g6.xlarge", "g5.xlarge", "g4dn.xlarge")
    assert defaults.aws.spot is False
    assert defaults.instance.poll_seconds == 5.0
    assert isinstance(defaults.instance.poll_seconds, float)
    assert defaults.training.extra_params == {}


def test_the_deployment_must_be_named() -> None:
    """No default: two deployments that both kept one would count, sweep and terminate each other's instances."""
    with pytest.raises(ConfigError, match=r"^aws\.deployment: '' is invalid; expected a name .* no other deployment"):
        load_settings(env={})
    with pytest.raises(ConfigError, match=r"^aws\.deployment: '' .*set TRAINER__AWS__DEPLOYMENT$"):
        load_settings(env={"TRAINER__AWS__DEPLOYMENT": " "})
    assert load_settings(env={"TRAINER__AWS__DEPLOYMENT": "prod-eu.2"}).aws.deployment == "prod-eu.2"


def test_environment_of_the_process_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER__TRAINING__EPOCHS", "7")
    monkeypatch.setenv("TRAINER__AWS__DEPLOYMENT", "test")
    assert load_settings().training.epochs == 7


def test_precedence_defaults_file_env_params(tmp_path: Path) -> None:
    env = write_toml(
        tmp_path, "[training]\nepochs = 11\nbatch_size = 64\nmodel = 'seed'\n[aws]\nregion = 'eu-west-1'\n"
    )
    from_file = load_settings(env=env)
    assert (from_file.training.epochs, from_file.training.batch_size) == (11, 64)
    assert from_file.aws.region == "eu-west-1"

    env |= {"TRAINER__TRAINING__EPOCHS": "12", "TRAINER__TRAINING__MODEL": "default"}
    from_env = load_settings(env=env)
    assert (from_env.training.epochs, from_env.training.batch_size, from_env.training.model) == (12, 64, "default")

    from_params = load_settings({"epochs": 13, "model": "seed"}, env=env)
    assert (from_params.training.epochs, from_params.training.batch_size, from_params.training.model) == (
        13,
        64,
        "seed",
    )
    assert from_params.aws.region == "eu-west-1"


def test_empty_params_keep_the_configured_values(defaults: Settings) -> None:
    settings = load_settings({"epochs": None, "instance_types": [], "data_uri": "", "git_ref": "main"}, env=DEPLOYED)
    assert settings == defaults


@pytest.mark.parametrize(("form", "spot"), [("true", True), ("false", False), (None, False)])
def test_the_forms_spot_choice_becomes_the_boolean_setting(form: str | None, spot: bool) -> None:
    # The form offers "true"/"false" as text (a boolean switch could not go back to empty = configured).
    assert load_settings({"spot": form}, env=DEPLOYED).aws.spot is spot


def test_every_param_maps_to_a_setting(defaults: Settings) -> None:
    for section, key in PARAM_FIELDS.values():
        assert key in getattr(defaults, section).model_dump()


def test_params_override_each_field() -> None:
    params = {
        "instance_types": ["p4d.24xlarge", "g6.xlarge"],
        "spot": True,
        "max_lifetime_minutes": 600,
        "ami_id": "ami-0123456789abcdef0",
        "epochs": 3,
        "batch_size": 32,
        "learning_rate": 0.01,
        "model": "seed",
        "data_uri": "synthetic://?size=64",
    }
    s = load_settings(params, env=DEPLOYED)
    assert s.aws.instance_types == ("p4d.24xlarge", "g6.xlarge")
    assert s.aws.spot is True
    assert s.aws.max_lifetime_minutes == 600
    assert s.aws.ami_id == "ami-0123456789abcdef0"
    assert (s.training.epochs, s.training.batch_size, s.training.learning_rate) == (3, 32, 0.01)
    assert (s.training.model, s.training.data_uri) == ("seed", "synthetic://?size=64")


def test_spot_false_param_overrides_a_true_setting() -> None:
    assert load_settings({"spot": False}, env={"TRAINER__AWS__SPOT": "true", **DEPLOYED}).aws.spot is False


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"epoch": 3},
            r"params: unknown key 'epoch'; did you mean 'epochs'\? the known keys are \['ami_id', 'batch_size'",
        ),
        ({"instance_type": ["g6.xlarge"]}, r"unknown key 'instance_type'; did you mean 'instance_types'\?"),
        ({"gitref": "main"}, r"unknown key 'gitref'; did you mean 'git_ref'\?"),
        ({"epochs": 3, "zzz": None}, r"unknown key 'zzz'; the known keys are"),
    ],
)
def test_unknown_param_keys_are_refused_with_the_closest_name(params: dict[str, Any], match: str) -> None:
    # Even with no value: a misspelt key must not silently train with the configured value instead.
    with pytest.raises(ConfigError, match=match):
        load_settings(params, env={})


@pytest.mark.parametrize("data_uri", ["   ", "-rf", "--data_uri=/etc"])
def test_data_uri_param_that_the_job_would_refuse_is_refused_here(data_uri: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.data_uri: .* is invalid; expected a data location"):
        load_settings({"data_uri": data_uri}, env=DEPLOYED)


def test_empty_data_uri_from_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"training\.data_uri: '' is invalid; expected a data location"):
        load_settings(env={"TRAINER__TRAINING__DATA_URI": " ", **DEPLOYED})


# ---- coercion from environment strings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True)],
        *[("false", False), ("0", False), ("No", False), (" off ", False)],
    ],
)
def test_bool_from_env(raw: str, expected: bool) -> None:
    assert load_settings(env={"TRAINER__AWS__SPOT": raw, **DEPLOYED}).aws.spot is expected


def test_lists_ints_floats_and_dicts_from_env() -> None:
    env = {
        "TRAINER__AWS__INSTANCE_TYPES": " g5.xlarge, g6.2xlarge ,",
        "TRAINER__AWS__SECURITY_GROUP_IDS": "sg-1,sg-2",
        "TRAINER__AWS__ROOT_VOLUME_GB": "200",
        "TRAINER__INSTANCE__POLL_SECONDS": "0.5",
        "TRAINER__MLFLOW__THRESHOLD": "0.75",
        "TRAINER__TRAINING__EXTRA_PARAMS": "max_images=100,image_size=64",
        "TRAINER__GITHUB__ALLOWED_CONCLUSIONS": "success",
        **DEPLOYED,
    }
    s = load_settings(env=env)
    assert s.aws.instance_types == ("g5.xlarge", "g6.2xlarge")
    assert s.aws.security_group_ids == ("sg-1", "sg-2")
    assert s.aws.root_volume_gb == 200
    assert s.instance.poll_seconds == 0.5
    assert s.mlflow.threshold == 0.75
    assert s.training.extra_params == {"max_images": "100", "image_size": "64"}
    assert s.github.allowed_conclusions == ("success",)


def test_job_requirements_from_env_are_space_separated_specifiers() -> None:
    env = {"TRAINER__INSTANCE__JOB_REQUIREMENTS": " boto3>=1.40,<2  moto[s3,ec2]~=5.2 nvidia-ml-py ", **DEPLOYED}
    s = load_settings(env=env)
    assert s.instance.job_requirements == ("boto3>=1.40,<2", "moto[s3,ec2]~=5.2", "nvidia-ml-py")
    assert load_settings(env={"TRAINER__INSTANCE__JOB_REQUIREMENTS": "", **DEPLOYED}).instance.job_requirements == ()


@pytest.mark.parametrize(
    "requirement",
    [
        # What would make the root bootstrap's pip or uv fetch from elsewhere, read a file, or run a build.
        "--index-url=https://evil.example/simple",
        "-r",
        "git+https://github.com/o/r",
        "pkg@https://evil.example/pkg.whl",
        "./local-folder",
        "pkg;python_version<'3.12'",
        "pkg>=",
        "-e.",
    ],
)
def test_job_requirements_refuse_urls_options_and_markers(requirement: str) -> None:
    with pytest.raises(ConfigError, match=r"instance\.job_requirements\[1\]: .* is invalid; expected pip requirement"):
        load_settings(env={"TRAINER__INSTANCE__JOB_REQUIREMENTS": f"numpy>=1.26 {requirement}", **DEPLOYED})


def test_empty_env_list_and_dict_become_empty() -> None:
    s = load_settings(env={"TRAINER__AWS__SECURITY_GROUP_IDS": "", "TRAINER__TRAINING__EXTRA_PARAMS": " ", **DEPLOYED})
    assert s.aws.security_group_ids == ()
    assert s.training.extra_params == {}


def test_env_strings_are_stripped() -> None:
    assert load_settings(env={"TRAINER__AWS__REGION": "  eu-central-1 ", **DEPLOYED}).aws.region == "eu-central-1"


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("TRAINER__AWS__SPOT", "maybe", r"aws\.spot: 'maybe' is not a boolean"),
        ("TRAINER__AWS__SPOT_FALLBACK_TO_ON_DEMAND", "2", r"aws\.spot_fallback_to_on_demand: '2' is not a boolean"),
        ("TRAINER__TRAINING__EPOCHS", "ten", r"training\.epochs: 'ten' is not a whole number"),
        ("TRAINER__TRAINING__EPOCHS", "1e3", r"training\.epochs: '1e3' is not a whole number"),
        ("TRAINER__TRAINING__LEARNING_RATE", "fast", r"training\.learning_rate: 'fast' is not a number"),
        ("TRAINER__INSTANCE__POLL_SECONDS", "nan", r"instance\.poll_seconds: nan is invalid"),
    ],
)
def test_bad_env_values_name_the_field(name: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(env={name: value, **DEPLOYED})


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"spot": "sometimes"}, r"aws\.spot: 'sometimes' is not a boolean"),
        ({"epochs": True}, r"training\.epochs: True is not a whole number"),
        ({"epochs": 2.5}, r"training\.epochs: 2\.5 is not a whole number"),
        ({"learning_rate": False}, r"training\.learning_rate: False is not a number"),
        ({"instance_types": 5}, r"aws\.instance_types: expected a list, got 5"),
        ({"instance_types": ["g6.xlarge", 3]}, r"aws\.instance_types\[1\]: expected text, got 3"),
        ({"model": 1}, r"training\.model: expected text, got 1"),
    ],
)
def test_bad_param_types_name_the_field(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(params, env={})


# ---- unknown names and bad files


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TRAINER__NOPE__REGION": "x"}, r"environment: unknown configuration section 'nope'"),
        ({"TRAINER__AWS__REGOIN": "x"}, r"environment: unknown setting aws\.regoin; known in \[aws\]: .*'region'"),
        ({"TRAINER__AWS": "x"}, r"TRAINER__AWS: expected TRAINER__<SECTION>__<KEY>"),
        ({"TRAINER__AWS__REGION__X": "x"}, r"TRAINER__AWS__REGION__X: expected TRAINER__<SECTION>__<KEY>"),
    ],
)
def test_unknown_env_names_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(env=env)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[nope]\nx = 1\n", r"TRAINER_CONFIG: unknown configuration section 'nope'"),
        ("[aws]\nregoin = 'eu-west-1'\n", r"TRAINER_CONFIG: unknown setting aws\.regoin"),
        ("aws = 3\n", r"TRAINER_CONFIG: unknown configuration section 'aws'"),
        ("[aws\n", r"not valid TOML"),
    ],
)
def test_bad_config_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(env=write_toml(tmp_path, text))


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"TRAINER_CONFIG: configuration file .*absent\.toml does not exist"):
        load_settings(env={"TRAINER_CONFIG": str(missing)})


# ---- validation rules

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("github", {"repo": "no-slash"}, r"github\.repo: repo 'no-slash' must look like 'owner/name'"),
    ("github", {"repo": "a/b/c"}, r"github\.repo"),
    ("github", {"repo": "own er/name"}, r"github\.repo"),
    ("github", {"api_url": "ftp://api.github.com"}, r"github\.api_url: 'ftp://api\.github\.com' is invalid"),
    ("github", {"api_url": "api.github.com"}, r"github\.api_url"),
    ("github", {"api_url": "https://x:secret@api.github.com"}, r"github\.api_url: '<redacted>'.*no credentials"),
    ("github", {"api_url": "https://ghp_token@api.github.com"}, r"github\.api_url: '<redacted>'.*no credentials"),
    ("github", {"branch": "; rm -rf /"}, r"github\.branch: git ref '; rm -rf /' is not a valid"),
    ("github", {"branch": "a..b"}, r"github\.branch"),
    ("github", {"conn_id": "has space"}, r"github\.conn_id: 'has space' is invalid; expected an Airflow connection"),
    ("github", {"ci_timeout_minutes": 0}, r"github\.ci_timeout_minutes: 0 is invalid; expected a value between 1"),
    ("github", {"ci_timeout_minutes": 24 * 60 + 1}, r"github\.ci_timeout_minutes"),
    ("github", {"ci_no_runs_timeout_minutes": -1}, r"github\.ci_no_runs_timeout_minutes"),
    ("github", {"ci_poll_seconds": 3601}, r"github\.ci_poll_seconds"),
    ("github", {"allowed_conclusions": ("success", "failure")}, r"github\.allowed_conclusions"),
    ("github", {"allowed_conclusions": ("skipped",)}, r"github\.allowed_conclusions.*includes 'success'"),
    ("aws", {"conn_id": ""}, r"aws\.conn_id"),
    ("aws", {"region": "us-east"}, r"aws\.region: 'us-east' is invalid; expected an AWS region"),
    ("aws", {"region": "US-EAST-1"}, r"aws\.region"),
    ("aws", {"region": "us-east-1; id"}, r"aws\.region"),
    ("aws", {"ami_ssm_parameter": "aws/service/x"}, r"aws\.ami_ssm_parameter"),
    ("aws", {"ami_ssm_parameter": "/aws/ x"}, r"aws\.ami_ssm_parameter"),
    ("aws", {"ami_id": "ami-0123"}, r"aws\.ami_id: 'ami-0123' is invalid; expected an AMI id"),
    ("aws", {"ami_id": "ami-0123456789ABCDEF0"}, r"aws\.ami_id"),
    ("aws", {"ami_id": "ami-0123456789abcdef0\n"}, r"aws\.ami_id"),
    ("aws", {"ami_id": "0123456789abcdef0"}, r"aws\.ami_id"),
    ("aws", {"instance_types": ()}, r"aws\.instance_types: \[\] is invalid; expected at least one"),
    ("aws", {"instance_types": ("g6.xlarge", "not a type!")}, r"aws\.instance_types\[1\]: 'not a type!' is invalid"),
    ("aws", {"instance_types": ("G6.xlarge",)}, r"aws\.instance_types\[0\]"),
    ("aws", {"instance_types": ("g6",)}, r"aws\.instance_types\[0\]"),
    (
        "aws",
        {"instance_types": ("g6.xlarge", "g6.xlarge")},
        r"aws\.instance_types: .* expected EC2 type names such as g6\.xlarge, no repeats",
    ),
    (
        "aws",
        {"instance_types": tuple(f"g{n}.xlarge" for n in range(MAX_INSTANCE_TYPES + 1))},
        r"aws\.instance_types: .* is invalid; expected .*up to 20",
    ),
    ("aws", {"subnet_id": "vpc-123"}, r"aws\.subnet_id: 'vpc-123' is invalid; expected empty or subnet-"),
    ("aws", {"subnet_ids": ("subnet-a", "vpc-1")}, r"aws\.subnet_ids\[1\]: 'vpc-1' is invalid; expected a subnet id"),
    (
        "aws",
        {"subnet_ids": ("subnet-a", "subnet-a")},
        r"aws\.subnet_ids: \['subnet-a', 'subnet-a'\] .* each subnet once",
    ),
    (
        "aws",
        {"subnet_ids": ("subnet-a",), "subnet_id": "subnet-b"},
        r"aws\.subnet_id: 'subnet-b' is invalid; expected empty when aws\.subnet_ids is set",
    ),
    ("aws", {"security_group_ids": ("sg-1", "default")}, r"aws\.security_group_ids\[1\]: 'default' is invalid"),
    ("aws", {"root_volume_gb": 7}, r"aws\.root_volume_gb: 7 is invalid"),
    ("aws", {"root_volume_gb": 16385}, r"aws\.root_volume_gb"),
    (
        "aws",
        {"max_lifetime_minutes": 9},
        r"aws\.max_lifetime_minutes: 9 is invalid; expected a whole number of minutes from 10 to 10080",
    ),
    ("aws", {"max_lifetime_minutes": 7 * 24 * 60 + 1}, r"aws\.max_lifetime_minutes"),
    ("aws", {"launch_timeout_minutes": 0}, r"aws\.launch_timeout_minutes"),
    ("aws", {"project_tag": "has space"}, r"aws\.project_tag"),
    ("aws", {"deployment": "prod/eu"}, r"aws\.deployment: 'prod/eu' is invalid; expected a name for this Airflow"),
    ("aws", {"deployment": "-x"}, r"aws\.deployment"),
    ("aws", {"deployment": "x" * 65}, r"aws\.deployment"),
    ("instance", {"ssh_user": "Root"}, r"instance\.ssh_user: 'Root' is invalid; expected a Unix user"),
    ("instance", {"ssh_user": "ubuntu;id"}, r"instance\.ssh_user"),
    ("instance", {"ssh_port": 0}, r"instance\.ssh_port"),
    ("instance", {"ssh_port": 65536}, r"instance\.ssh_port"),
    ("instance", {"address": "elastic_ip"}, r"instance\.address: 'elastic_ip' is invalid; expected public_ip or"),
    ("instance", {"state_dir": "relative/dir"}, r"instance\.state_dir: 'relative/dir' is invalid; expected an abs"),
    ("instance", {"state_dir": "/var/lib/$(id)"}, r"instance\.state_dir"),
    ("instance", {"python_bin": "python3"}, r"instance\.python_bin"),
    ("instance", {"ready_timeout_minutes": 241}, r"instance\.ready_timeout_minutes"),
    ("instance", {"poll_seconds": 0.05}, r"instance\.poll_seconds: 0\.05 is invalid"),
    ("mlflow", {"tracking_uri": "file:///tmp/mlruns"}, r"mlflow\.tracking_uri: 'file:///tmp/mlruns' is invalid"),
    ("mlflow", {"tracking_uri": "https://u:p@mlflow.example.com"}, r"mlflow\.tracking_uri: '<redacted>'"),
    ("mlflow", {"ui_url": "mlflow.example.com"}, r"mlflow\.ui_url: 'mlflow\.example\.com' is invalid"),
    ("mlflow", {"ui_url": "https://u:p@mlflow.example.com"}, r"mlflow\.ui_url: '<redacted>'"),
    ("mlflow", {"experiment": "  "}, r"mlflow\.experiment: '  ' is invalid; expected a non-empty"),
    ("mlflow", {"experiment": "exp\x1b[2J"}, r"mlflow\.experiment: .* without control characters"),
    ("mlflow", {"experiment": "exp\0"}, r"mlflow\.experiment: 'exp\\x00' is invalid"),
    ("mlflow", {"experiment": "exp\n"}, r"mlflow\.experiment"),
    ("mlflow", {"model_name": "my model"}, r"mlflow\.model_name"),
    ("mlflow", {"metric": "acc/test"}, r"mlflow\.metric"),
    ("training", {"entry_point": "main; id"}, r"training\.entry_point"),
    ("training", {"epochs": 0}, r"training\.epochs: 0 is invalid"),
    ("training", {"epochs": 10_001}, r"training\.epochs"),
    ("training", {"batch_size": 0}, r"training\.batch_size"),
    (
        "training",
        {"learning_rate": 0.0},
        r"training\.learning_rate: 0\.0 is invalid; expected a number above 0 and at most 1",
    ),
    ("training", {"learning_rate": 1.5}, r"training\.learning_rate"),
    ("training", {"learning_rate": float("nan")}, r"training\.learning_rate: nan is invalid; expected a number above"),
    ("training", {"learning_rate": float("inf")}, r"training\.learning_rate: inf is invalid"),
    ("training", {"model": "resnet"}, r"training\.model: 'resnet' is invalid; expected one of default, seed"),
    ("training", {"data_uri": "ftp://host/data"}, r"training\.data_uri: 'ftp://host/data' is invalid"),
    ("training", {"data_uri": "; rm -rf /"}, r"training\.data_uri: '; rm -rf /' is invalid"),
    ("training", {"data_uri": "s3://bucket/a\nb"}, r"training\.data_uri"),
    ("training", {"data_uri": "s3:///prefix"}, r"training\.data_uri: 's3:///prefix' is invalid; expected s3://bucket"),
    ("training", {"data_uri": "s3://b/" + "x" * 1024}, r"training\.data_uri"),
    ("training", {"data_uri": ""}, r"training\.data_uri: '' is invalid; expected a data location"),
    ("training", {"data_uri": " "}, r"training\.data_uri: ' ' is invalid"),
    ("training", {"data_uri": "-h"}, r"training\.data_uri: '-h' is invalid; .* not starting with '-'"),
    # What the job's own path rule (remote/pathnames.py) would refuse on the instance, refused before launch.
    ("training", {"data_uri": "s3://b/datasets/../"}, r"data_uri: .* without the path segment '\.\.' \(empty, "),
    ("training", {"data_uri": "s3://b/datasets/./v1/"}, r"data_uri: .* without the path segment '\.'"),
    ("training", {"data_uri": "s3://b/a//b/"}, r"data_uri: .* without the path segment ''"),
    ("training", {"data_uri": "s3://b/a\\b/"}, r"data_uri: .* without the path segment 'a\\\\b'"),
    ("training", {"data_uri": "s3://../p/"}, r"training\.data_uri: 's3://\.\./p/' is invalid; .* valid bucket name"),
    ("training", {"timeout_minutes": 0}, r"training\.timeout_minutes"),
    ("training", {"extra_params": {"bad-key": "1"}}, r"training\.extra_params: 'bad-key' is invalid"),
    ("training", {"extra_params": {"note": "two\nlines"}}, r"training\.extra_params\.note: 'two\\nlines' is invalid"),
    ("training", {"extra_params": {"note": "nul\0"}}, r"training\.extra_params\.note: .* without control characters"),
    ("training", {"extra_params": {"note": "a\tb"}}, r"training\.extra_params\.note"),
    ("training", {"extra_params": {"note": "a\x85b"}}, r"training\.extra_params\.note"),
    (
        "training",
        {"extra_params": {"epochs": "99"}},
        r"training\.extra_params\.epochs: '99' is invalid; expected no key",
    ),
    ("training", {"extra_params": {"git_sha": "f" * 40}}, r"training\.extra_params\.git_sha: .* the DAG sets itself"),
    ("training", {"extra_params": {"data_uri": "s3://b/x"}}, r"training\.extra_params\.data_uri"),
    ("training", {"timeout_minutes": 230}, r"aws\.max_lifetime_minutes: 240 is invalid; expected at least .* = 260"),
]


@pytest.mark.parametrize(("section", "changes", "match"), BAD_VALUES)
def test_validation_names_the_bad_field(defaults: Settings, section: str, changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(with_changes(defaults, section, **changes))


@pytest.mark.parametrize(
    "url",
    ["https://x:hunter2@api.github.com", "ftp://x:hunter2@api.github.com", "https://x:hunter2@host with space/"],
)
def test_credentials_never_reach_the_message(defaults: Settings, url: str) -> None:
    with pytest.raises(ConfigError, match=r"no credentials") as caught:
        validate(with_changes(defaults, "github", api_url=url))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("section", "changes"),
    [
        ("github", {"api_url": "https://github.example.com/api/v3"}),
        ("github", {"branch": "feature/x-1.2"}),
        ("github", {"branch": SHA}),
        ("aws", {"region": "us-gov-west-1"}),
        ("aws", {"instance_types": ("p4d.24xlarge", "g6e.xlarge")}),
        ("aws", {"subnet_id": "subnet-0abc", "security_group_ids": ("sg-0abc", "sg-1def")}),
        ("mlflow", {"tracking_uri": "http://127.0.0.1:5000"}),
        ("mlflow", {"ui_url": "https://mlflow.example.com/ui"}),
        ("training", {"data_uri": "/data/hurricane"}),
        ("training", {"data_uri": "file:///data/hurricane.zip"}),
        ("training", {"data_uri": "synthetic://?train_per_class=40&size=64"}),
        ("training", {"extra_params": {"max_images": "100", "note": "a b; c"}}),
    ],
)
def test_good_values_pass(defaults: Settings, section: str, changes: dict[str, Any]) -> None:
    validate(with_changes(defaults, section, **changes))


# Every pattern matches the whole value: `re.match` with `$` would let a trailing newline through.
@pytest.mark.parametrize(
    ("section", "name", "value"),
    [
        ("github", "conn_id", "github_default"),
        ("aws", "region", "us-east-1"),
        ("aws", "instance_types", ("g6.xlarge",)),
        ("aws", "project_tag", "ec2-trainer"),
        ("instance", "ssh_user", "ubuntu"),
        ("instance", "state_dir", "/var/lib/trainer"),
        ("instance", "python_bin", "/usr/bin/python3"),
        ("instance", "job_requirements", ("numpy>=1.26",)),
        ("mlflow", "model_name", "cnn"),
        ("mlflow", "metric", "test_accuracy"),
        ("training", "entry_point", "main"),
        ("training", "extra_params", {"max_images": "1"}),
    ],
)
def test_patterns_refuse_a_trailing_newline(defaults: Settings, section: str, name: str, value: Any) -> None:
    validate(with_changes(defaults, section, **{name: value}))
    if isinstance(value, tuple):
        with_newline: Any = tuple(v + "\n" for v in value)
    elif isinstance(value, dict):
        with_newline = {k + "\n": v for k, v in value.items()}
    else:
        with_newline = value + "\n"
    with pytest.raises(ConfigError, match=rf"{section}\.{name}.*\\n' is invalid"):
        validate(with_changes(defaults, section, **{name: with_newline}))


@pytest.mark.parametrize("uri", ["s3://bucket/prefix/", "synthetic://", "relative/folder", "file:///x.zip"])
def test_validate_data_uri_accepts(uri: str) -> None:
    validate_data_uri(uri)


# ---- git refs


@pytest.mark.parametrize("ref", ["main", "feature/x-1.2", "v1.0.0", "release_2024", SHA, "abc1234", " main "])
def test_validate_git_ref_accepts(ref: str) -> None:
    assert validate_git_ref(ref) == ref.strip()


@pytest.mark.parametrize(
    "ref",
    [
        *["; rm -rf /", "a..b", "-x", "has space", "$(id)", "`id`", "a|b", "main/", "x.lock", "a//b", ".hidden"],
        *["/abs", "main\nnext", "a" * 256],
    ],
)
def test_validate_git_ref_refuses(ref: str) -> None:
    with pytest.raises(ConfigError, match=r"^the_ref: git ref .* is not a valid branch, tag or sha: use letters"):
        validate_git_ref(ref, "the_ref")


def test_validate_git_ref_refuses_empty() -> None:
    with pytest.raises(ConfigError, match=r"^git_ref: git ref is empty: give a branch name"):
        validate_git_ref("  ")


# ---- derived values and round trip


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("https://api.github.com", "https://github.com"),
        ("https://api.github.com/", "https://github.com"),
        ("https://ghe.example.com/api/v3", "https://ghe.example.com"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
    ],
)
def test_html_base_url(api_url: str, expected: str) -> None:
    assert html_base_url(api_url) == expected


def test_to_dict_from_dict_round_trip_through_json() -> None:
    settings = load_settings(
        {"instance_types": ["g5.xlarge"], "spot": True},
        env={
            "TRAINER__TRAINING__EXTRA_PARAMS": "max_images=10",
            "TRAINER__AWS__SECURITY_GROUP_IDS": "sg-1",
            **DEPLOYED,
        },
    )
    data = json.loads(json.dumps(settings.to_dict()))
    assert Settings.from_dict(data) == settings


def test_from_dict_names_missing_and_unknown_keys(defaults: Settings) -> None:
    data = defaults.to_dict()
    del data["aws"]["region"]
    with pytest.raises(ConfigError, match=r"^aws\.region: missing setting"):
        Settings.from_dict(data)
    data = defaults.to_dict()
    data["mlflow"]["surprise"] = 1
    with pytest.raises(ConfigError, match=r"^mlflow\.surprise: unknown setting; known: \['conn_id', "):
        Settings.from_dict(data)
    with pytest.raises(ConfigError, match=r"^github: expected a table of settings"):
        Settings.from_dict({**defaults.to_dict(), "github": "acme/repo"})


def test_mlflow_links_use_the_ui_url_and_fall_back_to_the_tracking_uri(defaults: Settings) -> None:
    assert defaults.mlflow.ui_url == ""
    assert defaults.mlflow.ui_base_url == defaults.mlflow.tracking_uri
    internal = with_changes(defaults, "mlflow", tracking_uri="http://mlflow:5000", ui_url="http://127.0.0.1:5000")
    assert internal.mlflow.ui_base_url == "http://127.0.0.1:5000"


def test_retraining_is_off_by_default(defaults: Settings) -> None:
    assert defaults.datasets.uri == "" and defaults.datasets.sqs_queue_url == ""
    assert defaults.datasets.poll_minutes == 0 and defaults.retrain.schedule == ""
    assert defaults.datasets.marker == "_SUCCESS"
    assert defaults.retrain.ref(defaults.github) == defaults.github.branch


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TRAINER__DATASETS__URI": "s3://bucket/prefix"}, r"datasets.uri: .*ending in '/'"),
        ({"TRAINER__DATASETS__URI": "https://bucket/prefix/"}, r"datasets.uri: .*s3://bucket/prefix/"),
        ({"TRAINER__DATASETS__MARKER": "done/_SUCCESS"}, r"datasets.marker: .*without '/'"),
        ({"TRAINER__DATASETS__MARKER": ".."}, r"datasets.marker: '\.\.' is invalid; expected a file name, not empty"),
        ({"TRAINER__DATASETS__URI": "s3://bucket/a/../"}, r"datasets.uri: .* without the path segment '\.\.'"),
        ({"TRAINER__DATASETS__POLL_MINUTES": "5"}, r"datasets.uri: .*datasets.poll_minutes watches it"),
        ({"TRAINER__DATASETS__SQS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/1/q"}, r"datasets.sqs_queue_url"),
        ({"TRAINER__RETRAIN__SCHEDULE": "0 3 * * 1"}, r"datasets.uri: .*retrain.schedule"),
        (
            {"TRAINER__DATASETS__URI": "s3://b-1/p/", "TRAINER__RETRAIN__SCHEDULE": "every monday"},
            r"retrain.schedule: 'every monday' is invalid; expected empty \(off\) or a cron expression",
        ),
        ({"TRAINER__RETRAIN__BRANCH": "-x"}, r"retrain.branch"),
        (
            {"TRAINER__DATASETS__URI": "s3://b-1/p/", "TRAINER__DATASETS__SQS_QUEUE_URL": "https://u:p@sqs.example/q"},
            r"datasets.sqs_queue_url: '<redacted>'",
        ),
    ],
)
def test_retraining_settings_are_validated(env: dict[str, str], match: str) -> None:
    from orchestrator.config.settings import load_watch_settings

    with pytest.raises(ConfigError, match=match):
        load_settings(env={**DEPLOYED, **env})
    # The retraining DAGs' parse reads the same rules, and nothing else: aws.deployment may be unset there.
    with pytest.raises(ConfigError, match=match):
        load_watch_settings(env=env)


def test_watch_settings_read_only_their_sections() -> None:
    from orchestrator.config.settings import load_watch_settings

    watch = load_watch_settings(
        env={
            "TRAINER__DATASETS__URI": "s3://b-1/data/",
            "TRAINER__DATASETS__POLL_MINUTES": "15",
            "TRAINER__RETRAIN__SCHEDULE": "0 3 * * 1",
            "TRAINER__AWS__REGION": "eu-west-1",
        }
    )
    assert (watch.datasets.uri, watch.datasets.poll_minutes, watch.retrain.schedule) == (
        "s3://b-1/data/",
        15,
        "0 3 * * 1",
    )
    assert (watch.aws.conn_id, watch.aws.region) == ("aws_default", "eu-west-1")
