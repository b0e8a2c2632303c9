"""The path rule shared by the training job (remote/) and the pre-launch checks (dags/): two byte-identical copies,
since each deployment ships only its own folder (docs/decisions/0029-*.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import pathnames as orchestrator_pathnames
from remote import pathnames as remote_pathnames

ROOT = Path(__file__).resolve().parents[1]


def test_the_job_and_the_pre_launch_checks_hold_the_same_rule() -> None:
    job = (ROOT / "remote" / "pathnames.py").read_bytes()
    assert job == (ROOT / "dags" / "orchestrator" / "pathnames.py").read_bytes(), (
        "remote/pathnames.py and dags/orchestrator/pathnames.py differ: change both alike"
    )


@pytest.mark.parametrize("rules", [remote_pathnames, orchestrator_pathnames], ids=["remote", "dags"])
@pytest.mark.parametrize(
    ("relative", "bad"),
    [
        ("train/damage/a.jpeg", None),
        ("v1", None),
        ("..v1/a..b/.hidden/x.", None),  # dots inside a name are a plain name
        ("", ""),
        (".", "."),
        ("..", ".."),
        ("a/../b", ".."),
        ("a/./b", "."),
        ("a//b", ""),
        ("/abs", ""),
        ("a/", ""),
        ("a\\b", "a\\b"),
        ("a/b\x00c", "b\x00c"),
        ("a\nb", "a\nb"),
        ("a\x7fb", "a\x7fb"),
    ],
)
def test_unsafe_segments(rules: object, relative: str, bad: str | None) -> None:
    assert rules.unsafe_segment(relative) == bad  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "ok"), [("bkt", True), ("My_Bucket.1", True), ("..", False), ("-b", False)])
def test_bucket_names(name: str, ok: bool) -> None:
    assert bool(orchestrator_pathnames.BUCKET_NAME.fullmatch(name)) is ok
