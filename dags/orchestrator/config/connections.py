"""Credentials and clients from Airflow connections: the only place secrets enter the pipeline.

Nothing read here is logged, returned to XCom or put in a command line; callers hand secrets straight to the client
or to the remote job's 0600 environment file.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class MlflowCredentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def as_env(self) -> dict[str, str]:
        env = {}
        if self.username:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
        if self.password:
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        return env


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str = field(repr=False)

    def header(self) -> dict[str, str]:
        """The HTTP Authorization header (RFC 7617): for the request only, never logged."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}


def basic_auth(conn_id: str, setting: str) -> BasicAuth:
    """The login and password of the connection an optional setting names (e.g. metrics.conn_id): a service the
    setting says needs them, so a missing connection or login is an error naming the setting, not an open server."""
    try:
        conn = _connection(conn_id)
    except Exception as exc:
        raise ConfigError(
            f"{setting}: Airflow connection {conn_id!r} not found: create one with the login and password "
            "(see .env.example), or empty the setting for no authentication"
        ) from exc
    if not conn.login:
        raise ConfigError(f"{setting}: connection {conn_id!r} has no login")
    return BasicAuth(str(conn.login), str(conn.password or ""))


def _connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def ssh_private_key(conn_id: str) -> str:
    """The SSH client's private key (OpenSSH PEM) from the connection's `private_key` extra (SSH provider style)."""
    try:
        conn = _connection(conn_id)
    except Exception as exc:
        raise _no_ssh_connection(conn_id) from exc
    return _private_key_of(conn, conn_id)


async def assh_private_key(conn_id: str) -> str:
    """`ssh_private_key` for triggers: the triggerer reads the connection itself, so the key is never serialized."""
    from airflow.sdk import BaseHook

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except Exception as exc:
        raise _no_ssh_connection(conn_id) from exc
    return _private_key_of(conn, conn_id)


def _no_ssh_connection(conn_id: str) -> ConfigError:
    return ConfigError(
        f"instance.ssh_conn_id: Airflow connection {conn_id!r} not found: create an SSH connection whose extra "
        'holds {"private_key": "<OpenSSH private key>"} (see docs/production.md, Airflow connections)'
    )


def _private_key_of(conn: Any, conn_id: str) -> str:
    key = (conn.extra_dejson or {}).get("private_key")
    if not key:
        raise ConfigError(f"instance.ssh_conn_id: connection {conn_id!r} has no private_key in its extra")
    return str(key).replace("\\n", "\n")


def mlflow_credentials(conn_id: str) -> MlflowCredentials:
    """Optional basic-auth credentials of the tracking server; a missing connection means an open server."""
    try:
        conn = _connection(conn_id)
    except Exception:
        return MlflowCredentials()
    return MlflowCredentials(conn.login or None, conn.password or None)


async def amlflow_credentials(conn_id: str) -> MlflowCredentials:
    """`mlflow_credentials` for triggers, which must not read a connection synchronously."""
    from airflow.sdk import BaseHook

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except Exception:
        return MlflowCredentials()
    return MlflowCredentials(conn.login or None, conn.password or None)


# botocore's own retries, the only ones around an AWS call: throttling (RequestLimitExceeded), 5xx and connection
# errors, exponential backoff with jitter, at most this many HTTP attempts per call. A connection's extra
# `config_kwargs` {"retries": {...}} overrides it.
# (botocore's `max_attempts` counts retries only; `total_max_attempts` counts the first attempt too.)
AWS_RETRIES = {"mode": "standard", "total_max_attempts": 5}


class AwsClients:
    """boto3 clients of one connection for one step, all from one Amazon provider hook: the connection is read and
    its credentials resolved once (the provider logs where it found them, once per hook: a step that built a hook per
    service logged that line once per client). Credentials, role, endpoint_url and botocore config come from the
    connection; retries are AWS_RETRIES (with `total_attempts` HTTP attempts per call, when given) unless its
    config_kwargs say otherwise."""

    def __init__(self, conn_id: str, region: str) -> None:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        self.region = region
        self._hook = AwsBaseHook(aws_conn_id=conn_id, region_name=region)

    def client(self, service: str, *, region: str | None = None, total_attempts: int | None = None) -> Any:
        """The `service` client, in the step's region unless `region` says otherwise."""
        from botocore.config import Config

        hook = self._hook
        # The hook builds clients of its client_type (endpoint, user agent, verify): one hook, so one type at a time.
        hook.client_type = service
        # merge: what the connection sets explicitly wins; a copy, since botocore rewrites the dict it is given.
        retries = dict(AWS_RETRIES, **({"total_max_attempts": total_attempts} if total_attempts else {}))
        return hook.get_client_type(
            region_name=region or self.region, config=Config(retries=retries).merge(hook.config)
        )


def aws_client(service: str, conn_id: str, region: str, total_attempts: int | None = None) -> Any:
    """One client of `conn_id` (AwsClients' for a step that calls a single service)."""
    return AwsClients(conn_id, region).client(service, total_attempts=total_attempts)
