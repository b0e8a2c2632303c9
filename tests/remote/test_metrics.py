from __future__ import annotations

import math

import pytest

from remote.metrics import binary_metrics, roc_auc


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
