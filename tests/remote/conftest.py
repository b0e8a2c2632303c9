"""Shared fixtures: a tiny synthetic dataset in the real layout, generated once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from remote import synthetic

TINY = synthetic.SyntheticSpec(
    train_per_class=12, val_per_class=4, test_per_class=4, test_another_damage=4, test_another_no_damage=2, size=32
)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.materialize(TINY, tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_copy(tiny_root: Path, tmp_path: Path) -> Path:
    """A writable copy to break in a test."""
    target = tmp_path / "data"
    shutil.copytree(tiny_root, target)
    return target
