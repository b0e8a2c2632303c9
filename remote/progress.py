"""The one-line-per-epoch progress report, shaped for an Airflow task log."""

from __future__ import annotations

from remote.engine import EpochResult


def epoch_line(result: EpochResult, epochs: int, elapsed_s: float) -> str:
    """e.g. `epoch 3/30 train_loss=0.4123 train_acc=0.812 val_loss=... val_acc=... 61234 img/s 1.2s eta 0:00:33`."""
    remaining = elapsed_s / result.epoch * (epochs - result.epoch)
    minutes, seconds = divmod(round(remaining), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"epoch {result.epoch}/{epochs} train_loss={result.train_loss:.4f} train_acc={result.train_accuracy:.3f} "
        f"val_loss={result.val_loss:.4f} val_acc={result.val_accuracy:.3f} "
        f"{result.images_per_s:,.0f} img/s {result.seconds:.1f}s eta {hours}:{minutes:02d}:{seconds:02d}"
    )
