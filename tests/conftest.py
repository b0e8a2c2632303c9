"""Session-wide test set-up: an isolated Airflow home whose DAGs folder holds the project's DAGs and the test DAGs.

Airflow reads its DAGs folder once, at import, and `dag.test()` only runs DAGs found in it, so the folder is built
here, before anything imports Airflow.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="ec2-trainer-airflow-"))
_DAGS = _AIRFLOW_HOME / "dags"
_DAGS.mkdir()
for _entry in (REPO / "dags").iterdir():
    if _entry.name != "__pycache__":
        (_DAGS / _entry.name).symlink_to(_entry)
for _entry in (REPO / "tests" / "dag_fixtures").glob("*.py"):
    (_DAGS / _entry.name).symlink_to(_entry)

os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_DAGS)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """An initialised Airflow metadata database (SQLite in the session's Airflow home)."""
    from airflow.utils import db

    db.initdb()
    yield _AIRFLOW_HOME


@pytest.fixture(scope="session")
def dags_folder() -> Path:
    return _DAGS


pytest_plugins = [
    "tests.support.sshd",
    "tests.support.mlflow_servers",
    "tests.support.pipeline",
    "tests.support.github_api",
    "tests.support.fault_table",
    "tests.support.monitoring",
]
