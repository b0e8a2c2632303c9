"""The value types of the settings (orchestrator/settings.py) and their errors in the project's words.

A rule that a Field bound cannot state (a URL without credentials, an S3 prefix the job accepts, a cron expression)
is a validator here; `config_error` turns pydantic's ValidationError into the ConfigError that names the setting
(`training.epochs`), the value's problem and what a valid value is, as the hand-written loader said it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar
from urllib.parse import urlparse, urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError
from pydantic_settings import NoDecode

from orchestrator.ci.github_protocol import GitHubError, validate_ref, validate_repo
from orchestrator.config.run_params import BY_NAME, DAG_PARAMS, DATA_URI_SCHEMES, INSTANCE_TYPE_PATTERN, MAX_DATA_URI
from orchestrator.errors import ConfigError
from orchestrator.pathnames import BUCKET_NAME, SEGMENT_RULE, unsafe_segment

CONN_ID = r"[A-Za-z0-9_.-]{1,250}"
# An address as SMTP carries it (no display name): the notifier passes it as given to the mail server.
EMAIL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
# C0 and C1 control characters (NUL, newline, escape, ...): no name, URL or parameter value needs one.
CONTROL = r"[\x00-\x1f\x7f-\x9f]"
_T = TypeVar("_T")
_SCHEMA_BOUNDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "maxLength": "max_length"}


def full(pattern: str) -> str:
    """pydantic searches a pattern; `\\Z`, unlike `$`, lets no trailing newline through."""
    return rf"^(?:{pattern})\Z"


def setting(description: str, expected: str = "", pattern: str | None = None, **constraints: Any) -> Any:
    """A setting's Field: its description (docs/configuration.md) and, for a bound or pattern, a valid value in words
    (the ConfigError's "expected ..."; a range without one says "a value between ge and le")."""
    if expected:  # else the type's own words (_valid), if any
        constraints["json_schema_extra"] = {"expected": expected}
    return Field(description=description, pattern=full(pattern) if pattern else None, **constraints)


def _valid(expected: str) -> Any:
    """A type's valid values in words, for the configuration reference."""
    return Field(json_schema_extra={"expected": expected})


def run_param(name: str, description: str = "") -> Any:
    """The Field of a setting that a trigger-form knob overrides: the knob's bounds (run_params.RUN_PARAMS), stated
    once. What a Field cannot say (choices, repeats, list items) Settings checks against the same schema."""
    param = BY_NAME[name]
    bounds = {kw: param.schema[key] for key, kw in _SCHEMA_BOUNDS.items() if key in param.schema}
    if "maxItems" in param.schema:
        bounds["max_length"] = param.schema["maxItems"]
    extra: JsonDict = {"expected": param.range_text, "run_param": name}
    return Field(
        description=description or param.description,
        json_schema_extra=extra,
        pattern=param.schema.get("pattern"),
        **bounds,
    )


def check(ok: bool, value: Any, expected: str, at: str = "") -> None:
    """Refuse a value, in the loader's words; `at` names a part ("[1]", ".key") or another setting ("datasets.uri")."""
    if not ok:
        problem = f"{value!r} is invalid; expected {expected}"
        raise PydanticCustomError("invalid", "{problem}", {"problem": problem, "at": at})


# Stricter than pydantic's lax mode, which reads True as 1, 1 as True, "22.0" as 22 and "t" as True: a switch or a
# TOML `true` in a number's place must not train 1 epoch.
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _flag(value: Any) -> Any:
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _BOOLS):
        return value if isinstance(value, bool) else _BOOLS[value.strip().lower()]
    raise PydanticCustomError("bool_parsing", "not a boolean")


def _whole(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "not a whole number")
    try:
        return int(value) if isinstance(value, str) else value
    except ValueError:
        raise PydanticCustomError("int_parsing", "not a whole number") from None


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "not a number")
    return value


def _split_list(value: Any) -> Any:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _split_words(value: Any) -> Any:
    return value.split() if isinstance(value, str) else value


def _split_dict(value: Any) -> Any:
    """`key=value,key=value` from the environment; values as text, since they become `-P key=value`."""
    if isinstance(value, str):
        return dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _url(optional: bool) -> AfterValidator:
    def valid(url: str) -> str:
        if url or not optional:
            parts = urlparse(url)
            # Credentials first, so no later message can echo them; a user name alone is a token too on http(s).
            secret = parts.password or (parts.username and parts.scheme in ("http", "https"))
            check(not secret, "<redacted>", "no credentials inside the URL: use the Airflow connection")
            ok = (
                parts.scheme in ("http", "https")
                and bool(parts.netloc)
                and " " not in url
                and not re.search(CONTROL, url)
            )
            check(ok, url, "a URL with scheme http/https")
        return url

    return AfterValidator(valid)


def _github(rule: Callable[[str], object], optional: bool = False) -> AfterValidator:
    def valid(value: str) -> str:
        try:
            if value or not optional:
                rule(value)
        except GitHubError as exc:
            raise PydanticCustomError("problem", "{problem}", {"problem": str(exc)}) from None
        return value

    return AfterValidator(valid)


def s3_names(uri: str, at: str = "") -> None:
    """The bucket and key prefix obey the job's own rule (remote/pathnames.py): refused here, not on an instance
    already paid for. The prefix is read as the job reads it (leading '/' dropped, one trailing '/')."""
    parts = urlsplit(uri)
    check(bool(BUCKET_NAME.fullmatch(parts.netloc)), uri, "s3://bucket/prefix/ with a valid bucket name", at)
    prefix = parts.path.lstrip("/").removesuffix("/")
    bad = unsafe_segment(prefix) if prefix else None
    check(bad is None, uri, f"a key prefix without the path segment {bad!r} ({SEGMENT_RULE})", at)


def data_uri(uri: Any) -> Any:
    # Before the form's pattern, with the loader's words. The job would fail only on the instance, after the launch
    # was paid for: "" means no data, a leading "-" reaches the training script's argument parser as an option, and a
    # URI never holds raw whitespace or control characters (RFC 3986).
    if isinstance(uri, str):
        where = "a data location (s3://bucket/prefix/, file:///path, a path or synthetic://), not starting with '-'"
        check(bool(uri.strip()) and not uri.startswith("-"), uri, where)
        scheme = urlparse(uri).scheme or "file"
        printable = not any(c.isspace() or not c.isprintable() for c in uri)
        schemes = f"a URI with one of the schemes {list(DATA_URI_SCHEMES)} (a folder or .zip in the dataset's layout)"
        check(scheme in DATA_URI_SCHEMES and printable and len(uri) <= MAX_DATA_URI, uri, schemes)
        if scheme == "s3":
            s3_names(uri)
    return uri


def checkpoint_uri(uri: str) -> str:
    """Empty (beside the data), s3://bucket/prefix/ or an absolute folder on the instance: what the job's own
    validation (remote/checkpoint_store.py) accepts, refused here before a launch is paid for."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    # Credentials (a user, a presigned query) first, so no later message echoes them: the instance profile's role
    # is the job's only identity.
    secret = bool(parts.username or parts.password or parts.query)
    plain = "no credentials or query inside the URI: the instance profile's role writes the checkpoints"
    check(not secret, "<redacted>", plain)
    expected = (
        "empty (beside the data), s3://bucket/prefix/ or an absolute folder on the instance (/path or file:///path), "
        "without spaces; checkpoints.enabled = false turns checkpoints off"
    )
    printable = len(uri) <= MAX_DATA_URI and not any(c.isspace() or not c.isprintable() for c in uri)
    if parts.scheme == "s3":
        check(printable and not parts.fragment, uri, expected)
        s3_names(uri)
    else:
        folder = parts.path if parts.scheme == "file" else uri
        local = parts.scheme in ("", "file") and not (parts.fragment or parts.netloc)
        check(printable and local and folder.startswith("/"), uri, expected)
    return uri


def _extra_params(params: dict[str, str]) -> dict[str, str]:
    for key, value in params.items():
        check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key)), key, "parameter names like max_images")
        own = f"no key the DAG sets itself ({', '.join(sorted(DAG_PARAMS))}): use its own setting or trigger param"
        check(key not in DAG_PARAMS, value, own, f".{key}")
        line = len(value) <= 1024 and not re.search(CONTROL, value)
        check(line, value, "a single-line string without control characters", f".{key}")
    return params


def _some(names: tuple[str, ...]) -> tuple[str, ...]:
    check(bool(names), [], "at least one instance type, e.g. g6.xlarge")
    return names


def _cron(schedule: str) -> str:
    from croniter import croniter  # type: ignore[import-untyped]  # Airflow's own cron parser

    expected = "empty (off) or a cron expression such as '0 3 * * 1' (Mondays 03:00 UTC)"
    check(not schedule or croniter.is_valid(schedule), schedule, expected)
    return schedule


def _items(pattern: str) -> Any:
    """A list of names (comma-separated in the environment), each matching `pattern`."""
    return Annotated[tuple[Annotated[str, Field(pattern=full(pattern))], ...], NoDecode, BeforeValidator(_split_list)]


Flag = Annotated[bool, BeforeValidator(_flag)]
Whole = Annotated[int, BeforeValidator(_whole)]
Number = Annotated[float, BeforeValidator(_number)]
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_list)]
InstanceTypes = Annotated[Names, AfterValidator(_some)]
SecurityGroups = _items(r"sg-.*")
SubnetIds = _items(r"subnet-.*")
InstanceTypeNames = _items(INSTANCE_TYPE_PATTERN)
Emails = _items(EMAIL)
# pip requirement specifiers (name, extras, version specifiers; no URL, option or marker), space-separated in the
# environment: a specifier holds commas.
_VERSION = r"(?:~=|===|==|!=|<=|>=|<|>)[A-Za-z0-9.*+!_-]+"
REQUIREMENT = rf"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?(?:{_VERSION}(?:,{_VERSION})*)?"
Requirements = Annotated[
    tuple[Annotated[str, Field(pattern=full(REQUIREMENT))], ...], NoDecode, BeforeValidator(_split_words)
]
Url = Annotated[str, _url(optional=False), _valid("an http(s) URL without credentials")]
OptionalUrl = Annotated[str, _url(optional=True), _valid("empty, or an http(s) URL without credentials")]
Repo = Annotated[str, _github(validate_repo), _valid("owner/name")]
GitRef = Annotated[str, _github(validate_ref), _valid("a branch, tag or commit sha")]
OptionalGitRef = Annotated[str, _github(validate_ref, optional=True), _valid("empty, or a branch, tag or commit sha")]
DataUri = Annotated[str, BeforeValidator(data_uri)]
CheckpointUri = Annotated[str, AfterValidator(checkpoint_uri)]
ExtraParams = Annotated[
    dict[str, str],
    NoDecode,
    BeforeValidator(_split_dict),
    AfterValidator(_extra_params),
    _valid("names like max_images with single-line values; none that the DAG sets itself"),
]
Cron = Annotated[str, AfterValidator(_cron), _valid("empty (off) or a cron expression such as '0 3 * * 1'")]

# pydantic's error types that the hand-written loader met while coercing, before any rule: they are reported first.
_TYPE_PROBLEMS = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "{!r} is not a whole number"),
    **dict.fromkeys(("float_type", "float_parsing"), "{!r} is not a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "{!r} is not a boolean (true/false)"),
    **dict.fromkeys(("tuple_type", "list_type"), "expected a list, got {!r}"),
    **dict.fromkeys(("model_type", "model_attributes_type"), "expected a table of settings"),
    "string_type": "expected text, got {!r}",
    "dict_type": "expected a table of key = value",
    "missing": "missing setting",
    "extra_forbidden": "unknown setting",
}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def validate_data_uri(uri: str) -> None:
    try:
        data_uri(uri)
    except PydanticCustomError as exc:
        raise ConfigError(f"training.data_uri: {exc.message()}") from None


def translated(build: Callable[[], _T], model: type[BaseModel]) -> _T:
    """`build()`, its ValidationError raised as the ConfigError of `config_error`."""
    try:
        return build()
    except ValidationError as exc:
        raise config_error(exc, model) from None


def config_error(exc: ValidationError, model: type[BaseModel]) -> ConfigError:
    """The first problem as `section.key[n]: problem`; type errors first, as the loader coerced before checking."""
    error = min(exc.errors(), key=lambda e: e["type"] not in _TYPE_PROBLEMS)
    loc, kind, value, ctx = error["loc"], error["type"], error.get("input"), error.get("ctx") or {}
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    at = ctx.get("at", "")
    name = name + at if at[:1] in (".", "[") else ".".join(filter(None, (name, at)))
    field, beside = None, model.model_fields
    for part in loc:
        if isinstance(part, str) and part in beside:
            field, beside = beside[part], getattr(beside[part].annotation, "model_fields", {})
    if kind in ("invalid", "problem"):
        return ConfigError(f"{name}: {error['msg']}")
    if kind == "extra_forbidden":
        return ConfigError(f"{name}: unknown setting; {did_you_mean(str(loc[-1]), beside)}known: {sorted(beside)}")
    if kind in _TYPE_PROBLEMS:
        return ConfigError(f"{name}: {_TYPE_PROBLEMS[kind].format(value)}")
    extra = field.json_schema_extra if field and isinstance(field.json_schema_extra, dict) else {}
    bounds = {
        key: getattr(m, key) for m in (field.metadata if field else []) for key in ("ge", "le") if hasattr(m, key)
    }
    expected = extra.get("expected") or f"a value between {bounds.get('ge')} and {bounds.get('le')}"
    kind_of = field.annotation if field else None
    # The value as the setting holds it (an environment's "0" is 0), as the loader showed it.
    shown = kind_of(value) if kind_of in (int, float) and isinstance(value, str) else value  # type: ignore[misc]
    return ConfigError(f"{name}: {shown!r} is invalid; expected {expected}")
