"""remote.reports: the figures a person looks at in the MLflow run's artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from remote.engine import EpochResult
from remote.reports import learning_curves, learning_curves_figure


def _history(epochs: int) -> list[EpochResult]:
    return [EpochResult(n, 1.0 / n, 0.5 + n / 100, 1.1 / n, 0.5 + n / 120, 1.0, 100.0) for n in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 3, 7, 30])
def test_learning_curves_tick_whole_epochs_only(epochs: int) -> None:
    figure = learning_curves_figure(_history(epochs), best_epoch=epochs)
    figure.canvas.draw()  # the locator picks its ticks when drawn
    for axes in figure.axes:
        low, high = axes.get_xlim()
        shown = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert shown and all(float(tick).is_integer() for tick in shown), shown


def test_learning_curves_png(tmp_path: Path) -> None:
    path = learning_curves(_history(3), 2, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
