"""The production deployment, replicated on this machine: Airflow on PostgreSQL with Celery workers on Redis.

`deployment_settings()` reads config/deployment.env, the one list of settings docker-compose.yaml also loads;
`celery_environment()` adds the database and broker URLs of a local replica. `PostgresDatabase` and `RedisDatabase`
give a test its own database and Redis database number on the machine's servers, dropped and flushed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from pathlib import Path
from typing import Any

from embedded.process import Managed

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SETTINGS_FILE = REPO / "config" / "deployment.env"
# The servers the development and CI machines run (trust authentication on loopback).
POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# The key that marks a Redis database number as taken: claimed with SET NX, so two tests never share one.
_CLAIM_KEY = "ec2-trainer:claimed-by"
_CLAIM_SECONDS = 6 * 3600


def deployment_settings(path: Path = SETTINGS_FILE) -> dict[str, str]:
    """The KEY=VALUE lines of config/deployment.env (comments and blank lines skipped)."""
    settings = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ValueError(f"{path}:{number}: not a KEY=VALUE line: {raw!r}")
        settings[key] = value
    return settings


def celery_environment(database_url: str, broker_url: str) -> dict[str, str]:
    """The deployment's settings plus where this replica's metadata database, result backend and broker are."""
    if not database_url.startswith("postgresql+psycopg2://"):
        raise ValueError("the metadata database URL must name its driver: postgresql+psycopg2://...")
    return {
        **deployment_settings(),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url}",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
    }


class PostgresDatabase(Managed):
    """A database of its own on the machine's PostgreSQL, created by start() and dropped (connections and all)."""

    def __init__(self, prefix: str = "ec2_trainer") -> None:
        self.name = f"{prefix}_{secrets.token_hex(6)}"

    def url(self, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{POSTGRES_USER}@{POSTGRES_HOST}:{POSTGRES_PORT}/{self.name}"

    def connect(self, dbname: str | None = None) -> Any:
        """A psycopg2 connection to this database (or to `dbname` on the same server); the caller closes it."""
        import psycopg2

        return psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER, dbname=dbname or self.name)

    def _execute(self, statement: str) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction: autocommit, on the server's maintenance database.
        conn = self.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def start(self) -> None:
        self._execute(f'CREATE DATABASE "{self.name}"')
        log.info("PostgreSQL database %s created", self.name)

    def stop(self) -> None:
        # FORCE (PostgreSQL 13+) ends the sessions a killed component left open.
        self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class RedisDatabase(Managed):
    """A Redis database number nobody else uses, claimed atomically by start() and flushed by stop()."""

    def __init__(self, databases: int = 16) -> None:
        self._databases = databases
        self._token = secrets.token_hex(8)
        self.number: int | None = None

    @property
    def url(self) -> str:
        if self.number is None:
            raise RuntimeError("no Redis database claimed: start() first")
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.number}"

    def _client(self, number: int) -> Any:
        import redis

        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)

    def start(self) -> None:
        # Database 0 is everyone's default: never taken.
        for number in range(1, self._databases):
            client = self._client(number)
            try:
                # The claim expires: a test killed before its stop() frees the number by itself in time.
                if not client.set(_CLAIM_KEY, self._token, nx=True, ex=_CLAIM_SECONDS):
                    continue
                if client.dbsize() == 1:  # only our claim: nobody used it without claiming
                    self.number = number
                    log.info("Redis database %d claimed", number)
                    return
                client.delete(_CLAIM_KEY)
            finally:
                client.close()
        raise RuntimeError(f"every Redis database 1-{self._databases - 1} is in use")

    def stop(self) -> None:
        if self.number is None:
            return
        client = self._client(self.number)
        with contextlib.closing(client):
            if client.get(_CLAIM_KEY) == self._token.encode():
                client.flushdb()
        self.number = None
