"""Binary classification metrics, pure functions over labels and probabilities (damage = positive = 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from remote.engine import EpochResult

# MLflow 3.17's run page charts each "<section>/" prefix as its own section, sections in name order, then the
# unprefixed "Model metrics": per-epoch figures under prefixes come first, the learning curves before the speed,
# and the run's single values (the test scores, the gate's metric among them) stay unprefixed, after them.
LEARNING_SECTION = "learning/"
SPEED_SECTION = "speed/"


@dataclass(frozen=True)
class BinaryMetrics:
    """Scores for the positive class; `confusion` is [[tn, fp], [fn, tp]] (rows: true, columns: predicted)."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float
    confusion: tuple[tuple[int, int], tuple[int, int]]

    def scalars(self, prefix: str) -> dict[str, float]:
        """The scalar metrics as MLflow metric names, e.g. `test_accuracy`."""
        values = asdict(self)
        values.pop("confusion")
        return {f"{prefix}{name}": float(value) for name, value in values.items()}


def epoch_metrics(result: EpochResult) -> dict[str, float]:
    """One epoch's figures as MLflow metric names, logged at the epoch's step."""
    return {
        f"{LEARNING_SECTION}train_loss": result.train_loss,
        f"{LEARNING_SECTION}train_accuracy": result.train_accuracy,
        f"{LEARNING_SECTION}val_loss": result.val_loss,
        f"{LEARNING_SECTION}val_accuracy": result.val_accuracy,
        f"{SPEED_SECTION}epoch_time_s": result.seconds,
        f"{SPEED_SECTION}throughput_images_per_s": result.images_per_s,
    }


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half); NaN with one class only."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # average ranks over runs of tied scores
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    positives = sum(1 for label in labels if label == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = sum(rank for rank, label in zip(ranks, labels, strict=True) if label == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def binary_metrics(labels: Sequence[int], probabilities: Sequence[float], threshold: float = 0.5) -> BinaryMetrics:
    """Accuracy, precision, recall, F1 (of `damage`), ROC AUC and the confusion matrix; 0.0 where undefined."""
    if len(labels) != len(probabilities) or not labels:
        raise ValueError("labels and probabilities must be non-empty and of equal length")
    predicted = [1 if p >= threshold else 0 for p in probabilities]
    tp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 1 and p == 1)
    tn = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 0 and p == 0)
    fp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 0 and p == 1)
    fn = len(labels) - tp - tn - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BinaryMetrics(
        accuracy=(tp + tn) / len(labels),
        precision=precision,
        recall=recall,
        f1=f1,
        roc_auc=roc_auc(labels, probabilities),
        confusion=((tn, fp), (fn, tp)),
    )
