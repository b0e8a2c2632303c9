from __future__ import annotations

import copy

import pytest
import torch

from remote import dataset, engine
from remote.errors import ParameterError
from remote.models import DamageCNN
from remote.progress import epoch_line

CPU = torch.device("cpu")


def _options(seed: int, epochs: int, patience: int = 0) -> engine.FitOptions:
    return engine.FitOptions(
        epochs=epochs,
        batch_size=4,
        learning_rate=1e-3,
        device=CPU,
        bf16=False,
        early_stopping_patience=patience,
        seed=seed,
    )


def _splits(root) -> dict[str, dataset.LoadedSplit]:
    return {name: dataset.load_split(files, 32, CPU, 0) for name, files in dataset.scan(root).items()}


def _model(seed: int) -> torch.nn.Module:
    engine.seed_everything(seed)
    return engine.prepare_model(DamageCNN(32, (8, 16), 16, 0.2), CPU)


def _train(root, seed: int, epochs: int = 2) -> tuple[engine.FitResult, torch.Tensor]:
    splits = _splits(root)
    model = _model(seed)
    options = _options(seed, epochs)
    train = (splits["train_another"].images, splits["train_another"].labels)
    val = (splits["validation_another"].images, splits["validation_another"].labels)
    result = engine.fit(model, train, val, options)
    _, probabilities = engine.evaluate(model, splits["test"].images, splits["test"].labels, options)
    return result, probabilities


def test_fixed_seed_reproduces_metrics_on_cpu(tiny_root):
    first, probs_a = _train(tiny_root, seed=7)
    second, probs_b = _train(tiny_root, seed=7)
    third, _ = _train(tiny_root, seed=8)
    assert first.history == tuple(
        engine.EpochResult(**{**r.__dict__, "seconds": a.seconds, "images_per_s": a.images_per_s})
        for r, a in zip(second.history, first.history, strict=True)
    )
    assert torch.equal(probs_a, probs_b)
    assert third.history[0].train_loss != first.history[0].train_loss


def test_early_stopping_stops_and_restores_the_best_epochs_weights(tiny_root):
    """Validation labels are the training labels flipped: the better the model fits, the worse its validation loss,
    so validation loss rises, training stops early and the weights of the best epoch, not the last, are restored."""
    train_split = _splits(tiny_root)["train_another"]
    train = (train_split.images, train_split.labels)
    val = (train_split.images, 1 - train_split.labels)
    model, patience = _model(0), 2
    options = _options(0, epochs=12, patience=patience)
    weights: list[dict[str, torch.Tensor]] = []

    result = engine.fit(model, train, val, options, lambda _: weights.append(copy.deepcopy(model.state_dict())))

    losses = [r.val_loss for r in result.history]
    assert result.stopped_early, f"validation loss never rose for {patience} epochs: {losses}"
    assert len(result.history) == result.best_epoch + patience < options.epochs
    assert result.best_epoch == losses.index(min(losses)) + 1
    restored = model.state_dict()
    assert all(torch.equal(restored[name], weights[result.best_epoch - 1][name]) for name in restored)
    assert not all(torch.equal(restored[name], weights[-1][name]) for name in restored), "last epoch's weights kept"
    val_loss, _ = engine.evaluate(model, *val, options)
    assert val_loss.item() == pytest.approx(result.history[result.best_epoch - 1].val_loss, rel=1e-6)


def test_batch_larger_than_training_set_is_an_error():
    options = engine.FitOptions(epochs=1, batch_size=8, learning_rate=1e-3, device=CPU, bf16=False)
    data = (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4))
    with pytest.raises(ParameterError, match="batch_size 8 is larger than the 4 training images"):
        engine.fit(DamageCNN(32, (8,), 8, 0.0), data, data, options)


def test_device_and_precision_resolution_on_cpu():
    assert engine.resolve_device("auto").type in {"cpu", "cuda"}
    assert engine.resolve_device("cpu") == CPU
    assert engine.resolve_bf16("auto", CPU) is False
    assert engine.resolve_bf16("bf16", CPU) is True
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU is visible"):
            engine.resolve_device("cuda")


def test_emulated_bf16_does_not_count_as_support(monkeypatch):
    """A T4 (g4dn) emulates bf16, slower than fp32: `auto` must pick fp32 there and `bf16` must say why not."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert engine.resolve_bf16("auto", cuda) is False
    with pytest.raises(ParameterError, match="Tesla T4 has no native bf16"):
        engine.resolve_bf16("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert engine.resolve_bf16("auto", cuda) is True


def test_compile_is_on_by_default_on_cuda_only():
    assert engine.resolve_compile("auto", torch.device("cuda")) is True
    assert engine.resolve_compile("auto", CPU) is False
    assert engine.resolve_compile("false", torch.device("cuda")) is False
    assert engine.resolve_compile("true", CPU) is True


def test_progress_line():
    result = engine.EpochResult(2, 0.5, 0.75, 0.4, 0.8, 1.5, 61234.4)
    assert epoch_line(result, 4, elapsed_s=60.0) == (
        "epoch 2/4 train_loss=0.5000 train_acc=0.750 val_loss=0.4000 val_acc=0.800 61,234 img/s 1.5s eta 0:01:00"
    )


def test_fit_throughput_is_the_harmonic_mean_of_the_epochs():
    def epoch(n: int, images_per_s: float) -> engine.EpochResult:
        return engine.EpochResult(n, 0.5, 0.5, 0.5, 0.5, seconds=1.0, images_per_s=images_per_s)

    # 100 images at 100/s then at 300/s: 200 images in 1 + 1/3 s.
    fitted = engine.FitResult((epoch(1, 100.0), epoch(2, 300.0)), best_epoch=2, stopped_early=False)
    assert fitted.images_per_s == pytest.approx(150.0)
    assert engine.FitResult((), best_epoch=0, stopped_early=False).images_per_s == 0.0
