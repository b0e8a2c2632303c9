from __future__ import annotations

import pytest

from benchmarks.checkpoint_benchmark import overhead_percent


@pytest.mark.parametrize(
    ("epoch_s", "interval_s", "training_s_between"),
    [
        (10.0, 0.0, 10.0),  # checkpoint_minutes=0: every epoch
        (0.15, 600.0, 600.0),  # 4,000 epochs fill the interval exactly
        (7.0, 600.0, 602.0),  # the first epoch end past the interval: 86 epochs
        (900.0, 600.0, 900.0),  # an epoch longer than the interval: still one epoch apart
    ],
)
def test_checkpoints_are_a_whole_number_of_epochs_apart(epoch_s, interval_s, training_s_between):
    assert overhead_percent(0.2, epoch_s, interval_s) == pytest.approx(100 * 0.2 / training_s_between)
