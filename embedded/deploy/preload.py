"""The embedded deployments' Airflow local settings: the processes that fork tasks load the tasks' heavy libraries once.

Every task runs in a process forked from its worker (a LocalExecutor worker, itself forked from the scheduler, or a
Celery worker's pool process). The tasks import mlflow, boto3 and paramiko only when they run, so that DAG files
parse fast, and mlflow alone takes 2-4 s to import on a busy 2-core machine: each `train`, `evaluate` and `report`
paid it again. Loaded in the forking process before it forks, they are in every task's memory already. The tasks
import the same modules as before; only when the import happens changes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# What the tasks import lazily (orchestrator.tracking, .observe, .instance, .cloud); no module of Airflow's or the
# project's own: this runs while Airflow itself is initialising.
MODULES = ("mlflow", "mlflow.tracking", "boto3", "botocore.session", "paramiko")
# The components whose processes fork tasks; the api-server, dag-processor and triggerer run none.
_FORKS_TASKS = (("scheduler",), ("celery", "worker"))
# Airflow imports the module of this name from $AIRFLOW_HOME/config in every component at start, and copies its
# public names into airflow.settings: `__all__` empty, it copies none.
LOCAL_SETTINGS = "airflow_local_settings.py"
LOCAL_SETTINGS_SOURCE = f"from {__name__} import preload_for_tasks\n\n__all__: list[str] = []\npreload_for_tasks()\n"


def preload_for_tasks(argv: Sequence[str] | None = None) -> tuple[str, ...]:
    """Import MODULES when this process is a component that forks tasks; returns what it imported."""
    args = tuple((sys.argv if argv is None else argv)[1:])
    if not any(args[: len(command)] == command for command in _FORKS_TASKS):
        return ()
    for name in MODULES:
        importlib.import_module(name)
    return MODULES
