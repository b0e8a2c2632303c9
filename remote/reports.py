"""Artifacts a person looks at: learning curves and confusion-matrix PNGs (pure renderers over results)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from remote.engine import EpochResult
from remote.layout import CLASS_NAMES
from remote.metrics import BinaryMetrics


def learning_curves(history: Sequence[EpochResult], best_epoch: int, path: Path) -> Path:
    """Train/validation loss and accuracy per epoch, the best epoch marked, as a PNG."""
    learning_curves_figure(history, best_epoch).savefig(path, dpi=100)
    return path


def learning_curves_figure(history: Sequence[EpochResult], best_epoch: int) -> Figure:
    figure = Figure(figsize=(10, 4), layout="constrained")
    epochs = [result.epoch for result in history]
    for axes, metric, title in zip(
        figure.subplots(1, 2), ("loss", "accuracy"), ("Loss (BCE)", "Accuracy"), strict=True
    ):
        axes.plot(epochs, [getattr(r, f"train_{metric}") for r in history], marker="o", label="train")
        axes.plot(epochs, [getattr(r, f"val_{metric}") for r in history], marker="o", label="validation")
        axes.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch ({best_epoch})")
        axes.set(title=title, xlabel="epoch")
        # Epochs are whole: a 3-epoch run would otherwise be ticked 1.0, 1.25, 1.5, ...; one epoch gets one tick.
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def confusion_matrix(metrics: BinaryMetrics, split: str, path: Path) -> Path:
    """The confusion matrix with counts and row percentages."""
    figure = Figure(figsize=(4.5, 4), layout="constrained")
    axes = figure.subplots()
    counts = metrics.confusion
    axes.imshow(counts, cmap="Blues")
    for row in range(2):
        total = sum(counts[row]) or 1
        for column in range(2):
            value = counts[row][column]
            axes.text(column, row, f"{value}\n{100 * value / total:.1f}%", ha="center", va="center", color="black")
    axes.set_xticks([0, 1], CLASS_NAMES)
    axes.set_yticks([0, 1], CLASS_NAMES)
    axes.set(xlabel="predicted", ylabel="true", title=f"{split}: accuracy {metrics.accuracy:.3f}")
    figure.savefig(path, dpi=100)
    return path
