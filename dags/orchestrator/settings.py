"""One typed configuration for the whole pipeline: defaults, then a file, then environment, then DAG params.

Everything is validated up front so a bad value fails the run at trigger time, naming the field,
before any money is spent.
The settings hold no secret: credentials live in Airflow connections, named here only by their ids.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from orchestrator.errors import ConfigError
from orchestrator.github import GitHubError, html_base_url, validate_ref, validate_repo
from orchestrator.run_params import DATA_URI_SCHEMES, MAX_DATA_URI, RUN_PARAMS, RunParam, schema_violation
from orchestrator.training_command import DAG_PARAMS

DEFAULTS_FILE = Path(__file__).resolve().parents[2] / "config" / "defaults.toml"
CONFIG_FILE_ENV = "TRAINER_CONFIG"
ENV_PREFIX = "TRAINER__"

_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+$")
_CONN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
_PARAM_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_UNIX_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]+$")
# C0 and C1 control characters (NUL, newline, escape, ...): no name, URL or parameter value needs one.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Used verbatim as a tag value and in IAM policy conditions: plain characters only, so tag_value never alters it.
_DEPLOYMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# S3 bucket names (legacy us-east-1 ones allow capitals and underscores, as remote/sources.py accepts).
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_CONCLUSIONS = frozenset({"success", "skipped", "neutral"})
# An address as SMTP carries it (no display name): the notifier passes it as given to the mail server.
_EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
NOTIFY_ON = ("failure", "success", "both")


@dataclass(frozen=True)
class GitHubSettings:
    repo: str
    api_url: str
    branch: str
    conn_id: str
    ci_timeout_minutes: int
    ci_no_runs_timeout_minutes: int
    ci_poll_seconds: int
    allowed_conclusions: tuple[str, ...]


@dataclass(frozen=True)
class AwsSettings:
    conn_id: str
    region: str
    ami_ssm_parameter: str
    instance_types: tuple[str, ...]
    spot: bool
    spot_fallback_to_on_demand: bool
    subnet_id: str
    security_group_ids: tuple[str, ...]
    instance_profile: str
    root_volume_gb: int
    kms_key_id: str
    max_lifetime_minutes: int
    launch_timeout_minutes: int
    project_tag: str
    max_instances: int
    instance_wait_minutes: int
    deployment: str


@dataclass(frozen=True)
class InstanceSettings:
    ssh_conn_id: str
    ssh_user: str
    ssh_port: int
    address: str
    state_dir: str
    python_bin: str
    require_gpu: bool
    ready_timeout_minutes: int
    poll_seconds: float


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str
    ui_url: str
    conn_id: str
    experiment: str
    model_name: str
    metric: str
    threshold: float
    greater_is_better: bool

    @property
    def ui_base_url(self) -> str:
        """Where a person's browser opens MLflow: ui_url, or the tracking URI when that one is reachable as is."""
        return self.ui_url or self.tracking_uri


@dataclass(frozen=True)
class TrainingSettings:
    repo_url: str
    entry_point: str
    epochs: int
    batch_size: int
    learning_rate: float
    model: str
    data_uri: str
    timeout_minutes: int
    extra_params: dict[str, str] = field(default_factory=dict)
    # The long waits (train, wait_ready) hand their polling to the triggerer; false keeps them in the worker, for
    # deployments without a triggerer.
    deferrable: bool = True


@dataclass(frozen=True)
class MetricsSettings:
    """Per-run metrics pushed to a Prometheus Pushgateway by the report step; an empty URL turns them off."""

    pushgateway_url: str
    job: str
    conn_id: str  # optional Airflow connection whose login/password are the gateway's basic auth
    timeout_seconds: float

    @property
    def enabled(self) -> bool:
        return bool(self.pushgateway_url)


@dataclass(frozen=True)
class DatasetSettings:
    """Where new dataset versions land (orchestrator/datasets): each is a folder `<uri><version>/`, complete once its
    `marker` object is written. Empty uri: no dataset watching at all."""

    uri: str = ""
    marker: str = "_SUCCESS"
    # S3 event notifications of the marker go to this queue; an asset watcher reads it (empty: no watcher).
    sqs_queue_url: str = ""
    # Without SQS: look for a new complete version every this many minutes (0: no polling).
    poll_minutes: int = 0


@dataclass(frozen=True)
class RetrainSettings:
    """Retraining without a person: on new dataset versions (DatasetSettings) and, when set, on a schedule."""

    schedule: str = ""  # a cron expression (UTC); empty: no scheduled retraining
    branch: str = ""  # the git ref retrained; empty: github.branch

    def ref(self, github: GitHubSettings) -> str:
        return self.branch or github.branch


@dataclass(frozen=True)
class NotifySettings:
    """Optional alerts about each run (orchestrator/observe/notify.py); an empty connection id turns its channel off."""

    slack_webhook_conn_id: str = ""
    smtp_conn_id: str = ""
    email_to: tuple[str, ...] = ()
    # Empty: the SMTP connection's extra `from_email`.
    email_from: str = ""
    on: str = "both"
    timeout_seconds: int = 10

    @property
    def enabled(self) -> bool:
        return bool(self.slack_webhook_conn_id or self.smtp_conn_id)


@dataclass(frozen=True)
class Settings:
    github: GitHubSettings
    aws: AwsSettings
    instance: InstanceSettings
    mlflow: MlflowSettings
    training: TrainingSettings
    metrics: MetricsSettings
    datasets: DatasetSettings = field(default_factory=DatasetSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for XCom): holds no secret by construction."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        return _build(cls, data, "")

    @property
    def training_repo_url(self) -> str:
        """The git URL the instance clones: explicit, or the GitHub repository's own."""
        if self.training.repo_url:
            return self.training.repo_url
        return f"{html_base_url(self.github.api_url)}/{self.github.repo}.git"


# The per-run knobs of the DAG's trigger form (orchestrator/run_params.py), and the setting each one overrides.
PARAM_FIELDS: dict[str, tuple[str, str]] = {
    param.name: (param.setting.split(".")[0], param.setting.split(".")[1])
    for param in RUN_PARAMS
    if param.overrides_setting
}
PARAM_NAMES = frozenset(param.name for param in RUN_PARAMS)


def load_settings(
    params: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Layer defaults, the optional TRAINER_CONFIG file, TRAINER__* variables and DAG params; then validate."""
    raw = _layered(env)
    if params:
        _merge(raw, _param_overrides(params), "params")
    settings = Settings.from_dict(raw)
    validate(settings)
    return settings


def _layered(env: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if env is None else env
    raw = _read_toml(DEFAULTS_FILE)
    extra_file = env.get(CONFIG_FILE_ENV, "").strip()
    if extra_file:
        _merge(raw, _read_toml(Path(extra_file)), CONFIG_FILE_ENV)
    _merge(raw, _env_overrides(env), "environment")
    return raw


@dataclass(frozen=True)
class WatchSettings:
    """What the retraining DAGs need when their file is parsed (schedules, the asset and its watcher): only these
    sections are read and validated there, so a deployment's other settings never break their parsing."""

    datasets: DatasetSettings
    retrain: RetrainSettings
    aws_conn_id: str
    aws_region: str


def load_watch_settings(env: Mapping[str, str] | None = None) -> WatchSettings:
    raw = _layered(env)
    datasets = _build(DatasetSettings, raw["datasets"], "datasets.")
    retrain = _build(RetrainSettings, raw["retrain"], "retrain.")
    _validate_datasets(datasets)
    _validate_retrain(retrain, datasets)
    conn_id = _coerce(raw["aws"]["conn_id"], str, "aws.conn_id")
    region = _coerce(raw["aws"]["region"], str, "aws.region")
    _check(bool(_CONN_ID_RE.fullmatch(conn_id)), "aws.conn_id", conn_id, "an Airflow connection id")
    _check_match(_REGION_RE, region, "aws.region", "an AWS region such as us-east-1")
    return WatchSettings(datasets, retrain, conn_id, region)


def validate_git_ref(ref: str, name: str = "git_ref") -> str:
    """A branch, tag or full sha that is safe to pass anywhere; refuses what git or a shell could misread."""
    try:
        return validate_ref(ref)
    except GitHubError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def validate(s: Settings) -> None:
    """Check every value; raise ConfigError naming the first bad field and saying what would be right."""
    _validate_github(s.github)
    for name, conn_id in (
        ("github.conn_id", s.github.conn_id),
        ("aws.conn_id", s.aws.conn_id),
        ("instance.ssh_conn_id", s.instance.ssh_conn_id),
        ("mlflow.conn_id", s.mlflow.conn_id),
    ):
        _check(bool(_CONN_ID_RE.fullmatch(conn_id)), name, conn_id, "an Airflow connection id")
    _validate_aws(s.aws)
    _validate_instance(s.instance)
    _validate_mlflow(s.mlflow)
    _validate_training(s.training)
    _validate_metrics(s.metrics)
    _validate_datasets(s.datasets)
    _validate_retrain(s.retrain, s.datasets)
    _validate_notify(s.notify)
    for param in RUN_PARAMS:
        if param.overrides_setting:
            _check_param(s, param)
    a, i, t = s.aws, s.instance, s.training
    needed = a.launch_timeout_minutes + i.ready_timeout_minutes + t.timeout_minutes
    _check(
        a.max_lifetime_minutes >= needed,
        "aws.max_lifetime_minutes",
        a.max_lifetime_minutes,
        f"at least launch + ready + training timeouts = {needed} minutes, or the instance would power itself off "
        "in the middle of a run; raise it or lower training.timeout_minutes",
    )


def _validate_github(g: GitHubSettings) -> None:
    try:
        validate_repo(g.repo)
    except GitHubError as exc:
        raise ConfigError(f"github.repo: {exc}") from None
    _check_url(g.api_url, "github.api_url", ("http", "https"))
    validate_git_ref(g.branch, "github.branch")
    _check_range(g.ci_timeout_minutes, "github.ci_timeout_minutes", 1, 24 * 60)
    _check_range(g.ci_no_runs_timeout_minutes, "github.ci_no_runs_timeout_minutes", 1, 24 * 60)
    _check_range(g.ci_poll_seconds, "github.ci_poll_seconds", 1, 3600)
    unknown = sorted(set(g.allowed_conclusions) - _CONCLUSIONS)
    _check(
        not unknown and "success" in g.allowed_conclusions,
        "github.allowed_conclusions",
        list(g.allowed_conclusions),
        f"a subset of {sorted(_CONCLUSIONS)} that includes 'success'",
    )


def _validate_aws(a: AwsSettings) -> None:
    _check_match(_REGION_RE, a.region, "aws.region", "an AWS region such as us-east-1")
    _check(
        a.ami_ssm_parameter.startswith("/") and " " not in a.ami_ssm_parameter,
        "aws.ami_ssm_parameter",
        a.ami_ssm_parameter,
        "an SSM parameter name starting with '/', e.g. /aws/service/deeplearning/ami/...",
    )
    # The trigger form's bounds apply too (_check_param); as a setting the list must also not be empty.
    _check(bool(a.instance_types), "aws.instance_types", [], "at least one instance type, e.g. g6.xlarge")
    _check(
        not a.subnet_id or a.subnet_id.startswith("subnet-"),
        "aws.subnet_id",
        a.subnet_id,
        "empty or subnet-...",
    )
    for n, sg in enumerate(a.security_group_ids):
        _check(sg.startswith("sg-"), f"aws.security_group_ids[{n}]", sg, "a security group id sg-...")
    _check_range(a.root_volume_gb, "aws.root_volume_gb", 8, 16384)
    _check_range(a.launch_timeout_minutes, "aws.launch_timeout_minutes", 1, 120)
    _check_range(a.max_instances, "aws.max_instances", 1, 1000)
    _check_range(a.instance_wait_minutes, "aws.instance_wait_minutes", 0, 7 * 24 * 60)
    _check_match(r"[A-Za-z0-9_.:-]{1,64}", a.project_tag, "aws.project_tag", "a short tag")
    _check_match(
        _DEPLOYMENT_RE,
        a.deployment,
        "aws.deployment",
        "a name for this Airflow deployment that no other deployment in the AWS account uses, e.g. prod or "
        "staging (letters, digits, - _ ., up to 64): it scopes the instance cap, the sweeper, teardown and "
        "adoption, and the IAM policy's conditions (docs/iam.md); set TRAINER__AWS__DEPLOYMENT",
    )


def _validate_instance(i: InstanceSettings) -> None:
    _check_match(r"[a-z_][a-z0-9_-]{0,31}", i.ssh_user, "instance.ssh_user", "a Unix user")
    _check_range(i.ssh_port, "instance.ssh_port", 1, 65535)
    _check(i.address in ("public_ip", "private_ip"), "instance.address", i.address, "public_ip or private_ip")
    _check_match(_UNIX_PATH_RE, i.state_dir, "instance.state_dir", "an absolute path")
    _check_match(_UNIX_PATH_RE, i.python_bin, "instance.python_bin", "an absolute path")
    _check_range(i.ready_timeout_minutes, "instance.ready_timeout_minutes", 1, 240)
    _check_range(i.poll_seconds, "instance.poll_seconds", 0.1, 300)


def _validate_mlflow(m: MlflowSettings) -> None:
    _check_url(m.tracking_uri, "mlflow.tracking_uri", ("http", "https"))
    if m.ui_url:
        _check_url(m.ui_url, "mlflow.ui_url", ("http", "https"))
    _check(
        bool(m.experiment.strip()) and not _CONTROL_RE.search(m.experiment),
        "mlflow.experiment",
        m.experiment,
        "a non-empty experiment name without control characters",
    )
    _check_match(r"[A-Za-z0-9_.-]{1,128}", m.model_name, "mlflow.model_name", "a name")
    _check_match(r"[A-Za-z0-9_.-]{1,128}", m.metric, "mlflow.metric", "a metric name")


def _validate_training(t: TrainingSettings) -> None:
    if t.repo_url:
        _check_url(t.repo_url, "training.repo_url", ("https", "http", "git", "ssh", "file"))
    _check_match(r"[A-Za-z0-9_.-]{1,64}", t.entry_point, "training.entry_point", "a name")
    validate_data_uri(t.data_uri)
    _check_range(t.timeout_minutes, "training.timeout_minutes", 1, 7 * 24 * 60)
    for key, value in t.extra_params.items():
        _check_match(_PARAM_KEY_RE, key, "training.extra_params", "parameter names like max_images")
        _check(
            key not in DAG_PARAMS,
            f"training.extra_params.{key}",
            value,
            f"no key the DAG sets itself ({', '.join(sorted(DAG_PARAMS))}): use its own setting or trigger param",
        )
        _check(
            isinstance(value, str) and len(value) <= 1024 and not _CONTROL_RE.search(value),
            f"training.extra_params.{key}",
            value,
            "a single-line string without control characters",
        )


def _validate_metrics(m: MetricsSettings) -> None:
    if m.pushgateway_url:
        _check_url(m.pushgateway_url, "metrics.pushgateway_url", ("http", "https"))
    # The Pushgateway's job label: Prometheus's label-value rules are looser, but a plain name is all a job needs.
    _check_match(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", m.job, "metrics.job", "a name such as ec2_trainer")
    _check(
        not m.conn_id or bool(_CONN_ID_RE.fullmatch(m.conn_id)),
        "metrics.conn_id",
        m.conn_id,
        "empty (no auth) or an Airflow connection id",
    )
    _check_range(m.timeout_seconds, "metrics.timeout_seconds", 0.5, 60)


def _validate_datasets(d: DatasetSettings) -> None:
    if d.uri:
        parsed = urlparse(d.uri)
        _check(
            parsed.scheme == "s3"
            and bool(_BUCKET_RE.fullmatch(parsed.netloc))
            and d.uri.endswith("/")
            and not _CONTROL_RE.search(d.uri)
            and " " not in d.uri,
            "datasets.uri",
            d.uri,
            "empty, or s3://bucket/prefix/ (ending in '/') under which each dataset version is a folder",
        )
    _check_match(
        r"[A-Za-z0-9_.-]{1,128}",
        d.marker,
        "datasets.marker",
        "an object name without '/' (e.g. _SUCCESS) that the uploader writes last into a version's folder",
    )
    if d.sqs_queue_url:
        _check_url(d.sqs_queue_url, "datasets.sqs_queue_url", ("https", "http"))
    _check_range(d.poll_minutes, "datasets.poll_minutes", 0, 24 * 60)
    for name, on in (("datasets.sqs_queue_url", bool(d.sqs_queue_url)), ("datasets.poll_minutes", d.poll_minutes > 0)):
        _check(not on or bool(d.uri), "datasets.uri", d.uri, f"s3://bucket/prefix/: {name} watches it")


def _validate_retrain(r: RetrainSettings, d: DatasetSettings) -> None:
    if r.schedule:
        from croniter import croniter  # type: ignore[import-untyped]  # Airflow's own cron parser

        _check(
            croniter.is_valid(r.schedule),
            "retrain.schedule",
            r.schedule,
            "empty (off) or a cron expression such as '0 3 * * 1' (Mondays 03:00 UTC)",
        )
        _check(bool(d.uri), "datasets.uri", d.uri, "s3://bucket/prefix/: retrain.schedule retrains its latest version")
    if r.branch:
        validate_git_ref(r.branch, "retrain.branch")


def _validate_notify(n: NotifySettings) -> None:
    for name, conn_id in (
        ("notify.slack_webhook_conn_id", n.slack_webhook_conn_id),
        ("notify.smtp_conn_id", n.smtp_conn_id),
    ):
        _check(
            not conn_id or bool(_CONN_ID_RE.fullmatch(conn_id)),
            name,
            conn_id,
            "empty (off) or an Airflow connection id",
        )
    _check(n.on in NOTIFY_ON, "notify.on", n.on, " or ".join(NOTIFY_ON))
    _check_range(n.timeout_seconds, "notify.timeout_seconds", 1, 300)
    for i, address in enumerate(n.email_to):
        _check_match(_EMAIL_RE, address, f"notify.email_to[{i}]", "an e-mail address such as ml-team@example.com")
    if n.email_from:
        _check_match(_EMAIL_RE, n.email_from, "notify.email_from", "an e-mail address such as airflow@example.com")
    _check(
        not n.smtp_conn_id or bool(n.email_to),
        "notify.email_to",
        [],
        "at least one address when notify.smtp_conn_id is set (the mail has nowhere to go otherwise)",
    )


def validate_data_uri(uri: str) -> None:
    # The job would fail only on the instance, after the launch was paid for: "" means no data, and a leading "-"
    # reaches the training script's argument parser as an option.
    _check(
        bool(uri.strip()) and not uri.startswith("-"),
        "training.data_uri",
        uri,
        "a data location (s3://bucket/prefix/, file:///path, a path or synthetic://), not starting with '-'",
    )
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    # A URI never holds raw whitespace or control characters (RFC 3986); refusing them keeps shell-like text out.
    _check(
        scheme in DATA_URI_SCHEMES
        and not any(c.isspace() or not c.isprintable() for c in uri)
        and len(uri) <= MAX_DATA_URI,
        "training.data_uri",
        uri,
        f"a URI with one of the schemes {list(DATA_URI_SCHEMES)} (a folder or .zip in the dataset's layout)",
    )
    if scheme == "s3":
        _check(bool(parsed.netloc), "training.data_uri", uri, "s3://bucket/prefix/")


def _check_param(s: Settings, param: RunParam) -> None:
    """A setting that a trigger-form knob overrides obeys that knob's schema, whichever layer set it."""
    section, key = PARAM_FIELDS[param.name]
    value = getattr(getattr(s, section), key)
    violation = schema_violation(list(value) if isinstance(value, tuple) else value, param.schema)
    if violation:
        where, part = violation
        _check(False, f"{param.setting}{where}", tuple(part) if isinstance(part, list) else part, param.range_text)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is invalid; expected {expected}")


def _check_match(pattern: str | re.Pattern[str], value: str, name: str, expected: str) -> None:
    _check(bool(re.fullmatch(pattern, value)), name, value, expected)


def _check_range(value: float, name: str, low: float, high: float) -> None:
    _check(low <= value <= high, name, value, f"a value between {low} and {high}")


def _check_url(url: str, name: str, schemes: tuple[str, ...]) -> None:
    parsed = urlparse(url)
    # Credentials first, so no later message can echo them; a user name alone is a token too on http(s).
    _check(
        not parsed.password and not (parsed.username and parsed.scheme in ("http", "https")),
        name,
        "<redacted>",
        "no credentials inside the URL: use the Airflow connection",
    )
    _check(
        parsed.scheme in schemes
        and bool(parsed.netloc or parsed.scheme == "file")
        and " " not in url
        and not _CONTROL_RE.search(url),
        name,
        url,
        f"a URL with scheme {'/'.join(schemes)}",
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}: configuration file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _merge(base: dict[str, Any], override: Mapping[str, Any], source: str) -> None:
    for section, values in override.items():
        if section not in base or not isinstance(values, Mapping):
            raise ConfigError(f"{source}: unknown configuration section {section!r}; known: {sorted(base)}")
        for key, value in values.items():
            if key not in base[section]:
                raise ConfigError(
                    f"{source}: unknown setting {section}.{key}; known in [{section}]: {sorted(base[section])}"
                )
            base[section][key] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. TRAINER__AWS__REGION")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def check_param_names(names: Iterable[str]) -> None:
    """Refuse a trigger conf key the DAG does not know: a typo such as `epoch` would train with the defaults."""
    for name in sorted(set(names) - PARAM_NAMES):
        close = difflib.get_close_matches(name, sorted(PARAM_NAMES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"params: unknown key {name!r}; {hint}the known keys are {sorted(PARAM_NAMES)}")


def _param_overrides(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    check_param_names(params)
    out: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        if name in PARAM_FIELDS and value not in (None, "", []):
            section, key = PARAM_FIELDS[name]
            out.setdefault(section, {})[key] = value
    return out


_T = TypeVar("_T")


def _build(cls: type[_T], data: Mapping[str, Any], prefix: str) -> _T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"{name}: missing setting")
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], name)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"{prefix.rstrip('.') or 'settings'}: unknown keys {sorted(unknown)}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn TOML, environment strings and form values into the declared type, or say which field is wrong."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table of settings")
        return _build(hint, value, f"{name}.")  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(v, str, f"{name}[{n}]") for n, v in enumerate(items))
    if origin is dict:
        if isinstance(value, str):
            value = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv) if value.strip() else {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table of key = value")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name}: {value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}: {value!r} is not a whole number")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {value!r} is not a whole number") from exc
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {value!r} is not a number") from exc
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected text, got {value!r}")
        return value.strip()
    raise ConfigError(f"{name}: unsupported type {hint}")
