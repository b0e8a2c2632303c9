"""What a running `make ui` tells other commands (`make upload-dataset`): where its services answer and how to log
in, in <state folder>/ui.json, written once the deployment is up and removed when it stops.

The endpoints and keys are fresh on every start (free ports, random keys), so a command finds them only here. The
file holds credentials, so it is private to the user (0600), as the admin's passwords file is. Standard library only:
the commands that read it start fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "ui.json"


class NotRunning(RuntimeError):
    """No `make ui` serves this state folder; the message says what to do."""


@dataclass(frozen=True)
class RunningUi:
    pid: int  # the `make ui` process: a file left by one that was killed names a process that is gone
    airflow_url: str
    airflow_login: tuple[str, str]
    branch: str  # what ec2_retrain trains: the checkout's branch
    s3_endpoint: str
    region: str
    # The stand-in's own identity (its set-up's, unchecked by the IAM gate), as a data team's uploader would have one.
    access_key: str
    secret_key: str
    datasets_uri: str
    dataset_queue_url: str


def write(state_root: Path, running: RunningUi) -> Path:
    path = state_root / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    # Created 0600 before anything is written: the keys are never readable by others, even for a moment.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump(asdict(running), out, indent=2)
    return path


def remove(state_root: Path) -> None:
    (state_root / STATE_FILE).unlink(missing_ok=True)


def read(state_root: Path) -> RunningUi:
    """The running `make ui` of `state_root`; NotRunning when none runs (never started, stopped, or killed)."""
    path = state_root / STATE_FILE
    if not path.exists():
        raise NotRunning(
            f"no `make ui` is running on {state_root} (no {path.name} there): start it in another terminal with "
            "`make ui`, wait for its URLs, then run this again"
        )
    fields = json.loads(path.read_text())
    running = RunningUi(**{**fields, "airflow_login": tuple(fields["airflow_login"])})
    if not _alive(running.pid):
        raise NotRunning(
            f"the `make ui` that wrote {path} (process {running.pid}) is gone: it was killed before it could clean "
            "up. Start `make ui` again, wait for its URLs, then run this again"
        )
    return running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:  # gone, or (pid reused) another user's process: not the `make ui` that wrote the file
        return False
    return True
