"""The path rule for data names: which S3 key segments and bucket names the training job accepts.

Two byte-identical copies, remote/pathnames.py (the job, run from the trained commit on the instance) and
dags/orchestrator/pathnames.py (the pre-launch checks on Airflow): each deployment ships only its own folder, and
tests/test_pathnames.py fails when they differ (docs/decisions/0029-*.md). Standard library only.
"""

from __future__ import annotations

import re

# Legacy us-east-1 names allow capitals and underscores; a leading letter or digit keeps '.' and '..' out.
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SEGMENT_RULE = "empty, '.', '..', a leading '/', a backslash or a control character"


def unsafe_segment(relative: str) -> str | None:
    """The first '/'-separated segment of `relative` that could not be a plain file or folder name; None if all are.

    Refused rather than normalised: the names themselves are wrong, and two names must never land on one file.
    Backslashes are a separator on Windows; control characters (NUL included) no file system takes as given.
    """
    for part in relative.split("/"):
        if part in ("", ".", "..") or "\\" in part or any(ord(c) < 32 or ord(c) == 127 for c in part):
            return part
    return None
