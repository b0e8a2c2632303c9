"""One typed configuration for the whole pipeline: defaults, then a file, then environment, then DAG params.

pydantic-settings layers the sources and pydantic checks every value (types and rules: orchestrator/setting_types.py),
so a bad value fails the run at trigger time, naming the field, before any money is spent.
The settings hold no secret: credentials live in Airflow connections, named here only by their ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.ci.github_protocol import GitHubError, validate_ref
from orchestrator.config import setting_types as t
from orchestrator.config.run_params import BY_NAME, RUN_PARAMS, schema_violation
from orchestrator.config.setting_sources import (  # noqa: F401  # public
    CONFIG_FILE_ENV,
    DEFAULTS_FILE,
    ENV_PREFIX,
    layered,
)
from orchestrator.config.setting_types import check, run_param, setting, validate_data_uri  # noqa: F401  # public
from orchestrator.errors import ConfigError
from orchestrator.pathnames import SEGMENT_RULE, unsafe_segment

NOTIFY_ON = ("failure", "success", "both")
_CONN = {"pattern": t.CONN_ID, "expected": "an Airflow connection id"}
_OFF_CONN = {"pattern": f"|{t.CONN_ID}", "expected": "empty (off) or an Airflow connection id", "default": ""}
_PATH = {"pattern": r"/[A-Za-z0-9._/-]+", "expected": "an absolute path"}
_NAME = r"[A-Za-z0-9_.-]{1,128}"
_CONCLUSIONS = ("neutral", "skipped", "success")
_EXPERIMENT = "a non-empty experiment name without control characters"
_EMAIL_EXAMPLE = "an e-mail address such as %s@example.com"
_DEPLOYMENT = (
    "a name for this Airflow deployment that no other deployment in the AWS account uses, e.g. prod or staging "
    "(letters, digits, - _ ., up to 64): it scopes the instance cap, the reaper, teardown and adoption, and the IAM "
    "policy's conditions (docs/iam.md); set TRAINER__AWS__DEPLOYMENT"
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re", allow_inf_nan=False)


class GitHubSettings(_Section):
    repo: t.Repo = setting("owner/name of the repository whose CI gates training.")
    api_url: t.Url = setting("GitHub's API; GitHub Enterprise: https://HOST/api/v3.")
    branch: t.GitRef = setting("The git ref trained when a run names none.")
    conn_id: str = setting("Airflow connection; its password is the token (no password: anonymous).", **_CONN)
    ci_timeout_minutes: t.Whole = setting("Give up if the workflow runs have not all finished by then.", ge=1, le=1440)
    ci_no_runs_timeout_minutes: t.Whole = setting("Give up if no workflow run appears by then.", ge=1, le=1440)
    ci_poll_seconds: t.Whole = setting("Anonymous: at least 80 (GitHub: 60 requests an hour).", ge=1, le=3600)
    allowed_conclusions: t.Names = setting("Conclusions that pass the gate.", f"some of {_CONCLUSIONS}, success too")

    @model_validator(mode="after")
    def _conclusions(self) -> GitHubSettings:
        ok = set(self.allowed_conclusions) <= set(_CONCLUSIONS) and "success" in self.allowed_conclusions
        expected = f"a subset of {list(_CONCLUSIONS)} that includes 'success'"
        check(ok, list(self.allowed_conclusions), expected, "allowed_conclusions")
        return self


class AwsSettings(_Section):
    conn_id: str = setting("Airflow connection (credentials, region, optional endpoint_url).", **_CONN)
    region: str = setting("AWS region.", "an AWS region such as us-east-1", r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+")
    ami_ssm_parameter: str = setting(
        "SSM parameter naming the newest image; its PyTorch version leaves support in time: keep it current.",
        "an SSM parameter name starting with '/', e.g. /aws/service/deeplearning/ami/...",
        r"/[^ ]*",
    )
    ami_id: str = run_param("ami_id", "An exact image; empty: the newest image of ami_ssm_parameter.")
    instance_types: t.InstanceTypes = run_param("instance_types", "Tried in this order when capacity runs out.")
    allowed_instance_types: t.InstanceTypeNames = setting(
        "The types a run may ask for (the form offers them); empty: any.",
        "EC2 type names such as g6.xlarge",
        default=(),
    )
    spot: t.Flag = run_param("spot", "Ask for spot capacity first.")
    spot_fallback_to_on_demand: t.Flag = setting("With spot, fall back to on-demand when no spot capacity.")
    recovery: str = setting(
        "After a spot interruption, relaunch on: the next spot option (another zone, another type), then on-demand; "
        "spot options only; or on-demand at once.",
        "spot_then_on_demand, spot_only or on_demand",
        "spot_then_on_demand|spot_only|on_demand",
    )
    max_preemptions: t.Whole = setting(
        "Spot interruptions one run survives (each relaunches and resumes from the last checkpoint); 0: none.",
        ge=0,
        le=20,
    )
    subnet_id: str = setting("One subnet: the form of subnet_ids with one zone.", "empty or subnet-...", "|subnet-.*")
    subnet_ids: t.SubnetIds = setting(
        "Required (or subnet_id): one subnet per availability zone, in order; no capacity in one moves to the next.",
        "a subnet id subnet-...",
        default=(),
    )
    security_group_ids: t.SecurityGroups = setting("Required: one admits SSH.", "a security group id sg-...")
    instance_profile: str = setting("Instance profile name or ARN (S3 read for data, nothing else).")
    root_volume_gb: t.Whole = setting("At least the AMI's root snapshot (75 GB for PyTorch DLAMIs).", ge=8, le=16384)
    kms_key_id: str = setting("EBS encryption key; empty: the account's default EBS key.")
    max_lifetime_minutes: t.Whole = run_param("max_lifetime_minutes", "Hard deadline: the instance powers off then.")
    launch_timeout_minutes: t.Whole = setting("First RunInstances to running, relaunches included.", ge=1, le=120)
    project_tag: str = setting("Value of the ec2-trainer:project tag.", "a short tag", r"[A-Za-z0-9_.:-]{1,64}")
    max_instances: t.Whole = setting("Cap on this deployment's live instances, counted by tag in EC2.", ge=1, le=1000)
    instance_wait_minutes: t.Whole = setting("How long a launch waits for a free instance slot.", ge=0, le=10080)
    # Verbatim in tags and IAM policy conditions: plain characters only.
    deployment: str = setting(
        "Required: this deployment's name, unique in the AWS account; scopes every instance it sees.",
        _DEPLOYMENT,
        r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
    )

    @property
    def subnets(self) -> tuple[str, ...]:
        """The subnets to launch in, in order (subnet_ids, else subnet_id alone); empty when neither is set."""
        return self.subnet_ids or ((self.subnet_id,) if self.subnet_id else ())

    @model_validator(mode="after")
    def _one_subnet_setting(self) -> AwsSettings:
        # Two places for one list would leave a reader guessing which one launches.
        expected = "empty when aws.subnet_ids is set: list every subnet there"
        check(not (self.subnet_id and self.subnet_ids), self.subnet_id, expected, "subnet_id")
        check(
            len(set(self.subnet_ids)) == len(self.subnet_ids), list(self.subnet_ids), "each subnet once", "subnet_ids"
        )
        return self

    @model_validator(mode="after")
    def _allowed_types(self) -> AwsSettings:
        # Refused here, by the run's first task, not by plan_launch after the CI gate's wait.
        allowed = self.allowed_instance_types
        for index, name in enumerate(self.instance_types):
            expected = f"one of the types this deployment allows, {', '.join(allowed)} (aws.allowed_instance_types)"
            check(not allowed or name in allowed, name, expected, f"instance_types[{index}]")
        return self


class InstanceSettings(_Section):
    ssh_conn_id: str = setting("Airflow SSH connection holding the private key (extra.private_key).", **_CONN)
    ssh_user: str = setting("The image's login user.", "a Unix user", r"[a-z_][a-z0-9_-]{0,31}")
    ssh_port: t.Whole = setting("SSH port.", ge=1, le=65535)
    address: str = setting("private_ip when Airflow is in the VPC.", "public_ip or private_ip", "public_ip|private_ip")
    state_dir: str = setting("Bootstrap markers, logs and job directories on the instance.", **_PATH)
    python_bin: str = setting("The image's interpreter that has torch (the bootstrap adds mlflow).", **_PATH)
    job_requirements: t.Requirements = setting(
        "What the job imports beyond the image's torch and the pinned mlflow (python_env.yaml's other dependencies): "
        "the bootstrap installs those python_bin lacks; a baked image holds them.",
        "pip requirement specifiers such as 'boto3>=1.40,<2' (no URL or option)",
    )
    require_gpu: t.Flag = setting("The bootstrap fails on an instance without a working GPU.")
    ready_timeout_minutes: t.Whole = setting("From state running to SSH up and bootstrap finished.", ge=1, le=240)
    poll_seconds: t.Number = setting("How often to look at the instance, the bootstrap and the job.", ge=0.1, le=300)


class MlflowSettings(_Section):
    tracking_uri: t.Url = setting("Must be reachable from the instance and from Airflow.")
    ui_url: t.OptionalUrl = setting("Base URL of the MLflow UI for people's browsers; empty: tracking_uri.")
    conn_id: str = setting("Airflow connection with login/password for the tracking server.", **_CONN)
    experiment: str = setting("MLflow experiment.", _EXPERIMENT, r"(?=.*\S)[^\x00-\x1f\x7f-\x9f]+")
    model_name: str = setting("Registered model name.", "a name", _NAME)
    metric: str = setting("The metric that gates promotion to the champion alias.", "a metric name", _NAME)
    threshold: t.Number = setting("The metric's value a model must reach to be promoted.")
    greater_is_better: t.Flag = setting("Whether a higher metric is better.")

    @property
    def ui_base_url(self) -> str:
        """Where a person's browser opens MLflow: ui_url, or the tracking URI when that one is reachable as is."""
        return self.ui_url or self.tracking_uri


class TrainingSettings(_Section):
    entry_point: str = setting("MLproject entry point.", "a name", r"[A-Za-z0-9_.-]{1,64}")
    epochs: t.Whole = run_param("epochs")
    batch_size: t.Whole = run_param("batch_size")
    learning_rate: t.Number = run_param("learning_rate")
    model: str = run_param("model")
    data_uri: t.DataUri = run_param("data_uri")
    timeout_minutes: t.Whole = setting("How long the training job may run.", ge=1, le=10080)
    extra_params: t.ExtraParams = setting("More MLproject parameters, passed as -P key=value.", default_factory=dict)
    deferrable: t.Flag = setting("train and wait_ready wait in the triggerer; false: in a worker.", default=True)
    # Enforced on the instance by userdata/guard.sh (docs/decisions/0121-*): they hold while Airflow is down.
    stall_minutes: t.Number = setting(
        "Fail the run and power the instance off when the job prints nothing (no log line, no epoch) for this long; "
        "0: off.",
        ge=0,
        le=1440,
        default=30.0,
    )
    min_gpu_utilization: t.Whole = setting(
        "GPU utilisation (percent, nvidia-smi) under which the GPU counts as idle; 0: off (and with no GPU).",
        ge=0,
        le=100,
        default=10,
    )
    gpu_idle_minutes: t.Number = setting(
        "Fail the run and power the instance off when every GPU stays idle this long while the job runs.",
        ge=0.1,
        le=1440,
        default=15.0,
    )
    max_cost_usd: t.Number = setting(
        "Cost cap of a run (every attempt's instance and root volume): the job is stopped and the run fails before "
        "its cost would pass it; 0: off.",
        ge=0,
        le=1000000,
        default=0.0,
    )


class CheckpointSettings(_Section):
    """The training job's checkpoints (docs/decisions/0117-*): the state after a completed epoch, kept under
    `<uri>/<MLflow run id>/`, from which the job resumes when it is started again in the same MLflow run."""

    enabled: t.Flag = setting("Whether the job keeps checkpoints; false: none, whatever uri says.", default=True)
    uri: t.CheckpointUri = setting(
        "Empty: s3://<bucket of training.data_uri>/checkpoints/ when the data is on S3, else off. Another S3 place "
        "needs the instance policy's checkpoint statements changed (docs/iam.md).",
        "empty (beside the data), s3://bucket/prefix/ or an absolute folder on the instance",
        default="",
    )
    minutes: t.Number = setting(
        "Minutes between checkpoints, each at an epoch's end (and one after the last); 0: every epoch.",
        ge=0,
        le=1440,
        default=10.0,
    )


class MetricsSettings(_Section):
    """Per-run metrics pushed to a Prometheus Pushgateway by the report step; an empty URL turns them off."""

    pushgateway_url: t.OptionalUrl = setting("e.g. http://pushgateway:9091; empty: no metrics are pushed.")
    # Prometheus's label-value rules are looser, but a plain name is all a job needs.
    job: str = setting("The Pushgateway's job label.", "a name such as ec2_trainer", r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
    conn_id: str = setting(
        "Airflow connection whose login/password are the gateway's basic auth.",
        "empty (no auth) or an Airflow connection id",
        f"|{t.CONN_ID}",
    )
    timeout_seconds: t.Number = setting("Per HTTP request: a slow gateway never holds a run up.", ge=0.5, le=60)

    @property
    def enabled(self) -> bool:
        return bool(self.pushgateway_url)


class DatasetSettings(_Section):
    """Where new dataset versions land (orchestrator/datasets): each is a folder `<uri><version>/`, complete once its
    `marker` object is written. Empty uri: no dataset watching at all."""

    uri: str = setting("Where versions land; empty: off.", "empty, or s3://bucket/prefix/ ending in '/'", default="")
    marker: str = setting(
        "The object the uploader writes last into a version's folder.",
        "an object name without '/' (e.g. _SUCCESS) that the uploader writes last into a version's folder",
        _NAME,
        default="_SUCCESS",
    )
    sqs_queue_url: t.OptionalUrl = setting("Queue of the bucket's marker notifications; empty: no watcher.", default="")
    poll_minutes: t.Whole = setting("Without SQS: look for a version this often (0: never).", ge=0, le=1440, default=0)

    @model_validator(mode="after")
    def _watched(self) -> DatasetSettings:
        if self.uri:
            plain = re.fullmatch(rf"s3://[A-Za-z0-9][A-Za-z0-9._-]{{1,254}}(/[^ {t.CONTROL[1:-1]}]*)?/", self.uri)
            expected = "empty, or s3://bucket/prefix/ (ending in '/') under which each dataset version is a folder"
            check(bool(plain), self.uri, expected, "uri")
            t.s3_names(self.uri, "uri")
        check(unsafe_segment(self.marker) is None, self.marker, f"a file name, not {SEGMENT_RULE}", "marker")
        for name, on in (("sqs_queue_url", bool(self.sqs_queue_url)), ("poll_minutes", self.poll_minutes > 0)):
            check(not on or bool(self.uri), self.uri, f"s3://bucket/prefix/: datasets.{name} watches it", "uri")
        return self


class RetrainSettings(_Section):
    """Retraining without a person: on new dataset versions (DatasetSettings) and, when set, on a schedule."""

    schedule: t.Cron = setting("Cron (UTC) retraining on the latest complete version; empty: off.", default="")
    branch: t.OptionalGitRef = setting("The git ref retrained; empty: github.branch.", default="")

    def ref(self, github: GitHubSettings) -> str:
        return self.branch or github.branch


class BakeSettings(_Section):
    """Baked images (ec2_bake_image, docs/operations.md "Baked images"): the base image with the bootstrap's installs
    done, so a training boot skips them."""

    schedule: t.Cron = setting("Cron (UTC) baking an image; empty: by hand only.", default="")
    use: bool = setting(
        "Train on this deployment's baked image when it was made by the current bootstrap.", default=True
    )
    keep: t.Whole = setting(
        "Baked images kept; older ones are deregistered with their snapshots.", ge=1, le=20, default=2
    )
    image_wait_minutes: t.Whole = setting(
        "How long a new image may take to become available.", ge=1, le=240, default=60
    )


class NotifySettings(_Section):
    """Optional alerts about each run (orchestrator/observe/notify.py); an empty connection id turns its channel off."""

    slack_webhook_conn_id: str = setting("Connection of type slackwebhook: password = the webhook URL.", **_OFF_CONN)
    smtp_conn_id: str = setting("Connection of type smtp: host, port, login/password, TLS extras.", **_OFF_CONN)
    email_to: t.Emails = setting("Recipients; required with smtp_conn_id.", _EMAIL_EXAMPLE % "ml-team", default=())
    email_from: str = setting(
        "Sender; empty: the SMTP connection's extra from_email.",
        _EMAIL_EXAMPLE % "airflow",
        f"|{t.EMAIL}",
        default="",
    )
    on: str = setting("Which runs are announced.", " or ".join(NOTIFY_ON), "|".join(NOTIFY_ON), default="both")
    timeout_seconds: t.Whole = setting("How long Slack may take (SMTP: its connection's).", ge=1, le=300, default=10)

    @model_validator(mode="after")
    def _addressed(self) -> NotifySettings:
        expected = "at least one address when notify.smtp_conn_id is set (the mail has nowhere to go otherwise)"
        check(not self.smtp_conn_id or bool(self.email_to), [], expected, "email_to")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.slack_webhook_conn_id or self.smtp_conn_id)


def _retrain_has_data(retrain: RetrainSettings, datasets: DatasetSettings) -> None:
    needed = "s3://bucket/prefix/: retrain.schedule retrains its latest version"
    check(not retrain.schedule or bool(datasets.uri), datasets.uri, needed, "datasets.uri")


class _Layered(BaseSettings):
    """Sources, highest first: a run's params, TRAINER__SECTION__KEY variables, the TRAINER_CONFIG file, defaults."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    @classmethod
    def _load(cls, env: Mapping[str, str] | None, params: dict[str, dict[str, Any]]) -> Any:
        sources = layered(cls, Settings, env, params)
        return t.translated(lambda: cls(_build_sources=(sources, {})), cls)  # type: ignore[call-arg]  # BaseSettings own argument


class Settings(_Layered):
    github: GitHubSettings
    aws: AwsSettings
    instance: InstanceSettings
    mlflow: MlflowSettings
    training: TrainingSettings
    checkpoints: CheckpointSettings = CheckpointSettings()
    metrics: MetricsSettings
    datasets: DatasetSettings = DatasetSettings()
    retrain: RetrainSettings = RetrainSettings()
    bake: BakeSettings = BakeSettings()
    notify: NotifySettings = NotifySettings()

    @model_validator(mode="after")
    def _across_sections(self) -> Settings:
        _retrain_has_data(self.retrain, self.datasets)
        # The form's schema beyond a Field's bounds (choices, repeats, list items), whichever layer set the value.
        for name, (section, key) in PARAM_FIELDS.items():
            param, value = BY_NAME[name], getattr(getattr(self, section), key)
            violation = schema_violation(list(value) if isinstance(value, tuple) else value, param.schema)
            if violation:
                part = tuple(violation[1]) if isinstance(violation[1], list) else violation[1]
                check(False, part, param.range_text, f"{param.setting}{violation[0]}")
        a, i, tr = self.aws, self.instance, self.training
        needed = a.launch_timeout_minutes + i.ready_timeout_minutes + tr.timeout_minutes
        expected = (
            f"at least launch + ready + training timeouts = {needed} minutes, or the instance would power itself off "
            "in the middle of a run; raise it or lower training.timeout_minutes"
        )
        check(a.max_lifetime_minutes >= needed, a.max_lifetime_minutes, expected, "aws.max_lifetime_minutes")
        return self

    @property
    def checkpoint_uri(self) -> str:
        """Where the job keeps its checkpoints, "" for nowhere: checkpoints.uri, else beside the data when that is on
        S3 (the prefix config/iam/instance.json lets the instance write)."""
        if not self.checkpoints.enabled:
            return ""
        data = urlsplit(self.training.data_uri)
        beside = f"s3://{data.netloc}/checkpoints/" if data.scheme == "s3" else ""
        return self.checkpoints.uri or beside

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for XCom): holds no secret by construction."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        return t.translated(lambda: cls.model_validate(data), cls)


class _WatchAws(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", regex_engine="python-re")
    conn_id: Annotated[str, AwsSettings.model_fields["conn_id"]]
    region: Annotated[str, AwsSettings.model_fields["region"]]


class WatchSettings(_Layered):
    """What the retraining and bake DAGs need when their file is parsed (schedules, the asset and its watcher): only
    these sections are read and validated there, so a deployment's other settings never break their parsing."""

    model_config = SettingsConfigDict(extra="ignore")
    datasets: DatasetSettings
    retrain: RetrainSettings
    bake: BakeSettings = BakeSettings()
    aws: _WatchAws

    @model_validator(mode="after")
    def _across_sections(self) -> WatchSettings:
        _retrain_has_data(self.retrain, self.datasets)
        return self


# The per-run knobs of the DAG's trigger form (orchestrator/run_params.py), and the setting each one overrides.
PARAM_FIELDS: dict[str, tuple[str, str]] = {
    p.name: (p.setting.split(".")[0], p.setting.split(".")[1]) for p in RUN_PARAMS if p.overrides_setting
}
PARAM_NAMES = frozenset(param.name for param in RUN_PARAMS)


def load_settings(params: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Layer defaults, the optional TRAINER_CONFIG file, TRAINER__* variables and DAG params; then validate."""
    check_param_names(params or {})
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in (params or {}).items():
        if name in PARAM_FIELDS and value not in (None, "", []):  # empty: the configured value
            section, key = PARAM_FIELDS[name]
            overrides.setdefault(section, {})[key] = value
    return Settings._load(env, overrides)


def load_watch_settings(env: Mapping[str, str] | None = None) -> WatchSettings:
    return WatchSettings._load(env, {})


def validate(settings: Settings) -> None:
    """Check settings changed without validation (model_copy): ConfigError names the first bad field."""
    Settings.from_dict(settings.model_dump())


def validate_git_ref(ref: str, name: str = "git_ref") -> str:
    """A branch, tag or full sha that is safe to pass anywhere; refuses what git or a shell could misread."""
    try:
        return validate_ref(ref)
    except GitHubError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def check_param_names(names: Iterable[str]) -> None:
    """Refuse a trigger conf key the DAG does not know: a typo such as `epoch` would train with the defaults."""
    for name in sorted(set(names) - PARAM_NAMES):
        hint = t.did_you_mean(name, PARAM_NAMES)
        raise ConfigError(f"params: unknown key {name!r}; {hint}the known keys are {sorted(PARAM_NAMES)}")
