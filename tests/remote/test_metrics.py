from __future__ import annotations

import math

import pytest

from remote.engine import EpochResult
from remote.metrics import binary_metrics, epoch_metrics, roc_auc


def test_hand_worked_example():
    # labels 1 1 1 0 0 0 0 ; predictions at 0.5: 1 1 0 1 0 0 0 -> tp 2, fn 1, fp 1, tn 3
    labels = [1, 1, 1, 0, 0, 0, 0]
    probs = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4]
    result = binary_metrics(labels, probs)
    assert result.confusion == ((3, 1), (1, 2))
    assert result.accuracy == pytest.approx(5 / 7)
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 / 3)
    # positive/negative pairs ranked correctly: 0.9 and 0.8 beat all 4; 0.3 beats 0.2 and 0.1 -> 10 of 12
    assert result.roc_auc == pytest.approx(10 / 12)
    assert result.scalars("test_")["test_f1"] == pytest.approx(2 / 3)


def test_ties_count_half_and_one_class_is_nan():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.9]))


def test_no_positive_prediction_gives_zero_not_division_error():
    result = binary_metrics([1, 0], [0.1, 0.2])
    assert (result.precision, result.recall, result.f1) == (0.0, 0.0, 0.0)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="equal length"):
        binary_metrics([1], [0.1, 0.2])


def _run_page_order(names: list[str]) -> list[str]:
    """The charts' order on MLflow 3.17's run page (getBaseChartAndSectionConfigs): a section per prefix before the
    last "/", sections by name, the unprefixed "Model metrics" last; charts by name within a section."""

    def section(name: str) -> str:
        return name.rpartition("/")[0]

    return sorted(names, key=lambda name: (section(name) == "", section(name), name))


def test_the_learning_curves_come_first_on_the_run_page():
    epoch = epoch_metrics(EpochResult(2, 0.5, 0.75, 0.4, 0.8, 1.5, 600.0))
    assert epoch["learning/val_loss"] == 0.4 and epoch["speed/throughput_images_per_s"] == 600.0
    single_values = [*binary_metrics([1, 0], [0.9, 0.1]).scalars("test_"), "best_epoch", "decode_time_s"]
    order = _run_page_order([*single_values, *epoch])
    assert order[:4] == [f"learning/{name}" for name in ("train_accuracy", "train_loss", "val_accuracy", "val_loss")]
    assert order[4:6] == ["speed/epoch_time_s", "speed/throughput_images_per_s"]
    # The single values (the gate's test_accuracy among them) stay unprefixed: bar charts, after the curves.
    assert set(order[6:]) == set(single_values) and "test_accuracy" in single_values
