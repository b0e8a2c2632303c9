"""Shared pytest fixture: a real MLflow tracking server on loopback (SQLite, proxied artifacts) for the session.

Registered for the whole test tree through `pytest_plugins` in tests/conftest.py. Starting it takes a few seconds,
so it is shared; tests keep apart by using their own experiment and registered model names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from embedded.mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow server; its tracking URI is `.url`."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
