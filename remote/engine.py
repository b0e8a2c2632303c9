"""The training loop over tensors already resident on the device.

One code path for CPU and GPU. On CUDA it adds what makes it fast: bf16 autocast, channels_last, fused Adam,
cuDNN autotuning and optional torch.compile; no host synchronisation inside an epoch (losses are summed on the device).
Augmentation (random horizontal and vertical flips) runs on the device. The best epoch by validation loss is kept
and restored at the end, so it is the one evaluated. A fit can be checkpointed after any epoch and continued from
there (remote/checkpoints.py): everything the loop carries from one epoch to the next is in `Loop`.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from remote.errors import ParameterError

log = logging.getLogger(__name__)

_EVAL_BATCH = 1024


@dataclass(frozen=True)
class FitOptions:
    """How to train: already resolved to a concrete device and precision."""

    epochs: int
    batch_size: int
    learning_rate: float
    device: torch.device
    bf16: bool
    compile: bool = False
    early_stopping_patience: int = 0
    augment: bool = True
    seed: int = 0


@dataclass(frozen=True)
class EpochResult:
    """One epoch's figures; `images_per_s` counts training images only."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class FitResult:
    history: tuple[EpochResult, ...]
    best_epoch: int
    stopped_early: bool

    @property
    def images_per_s(self) -> float:
        """Training throughput over the whole fit: every epoch trains on the same images, so the harmonic mean."""
        return len(self.history) / sum(1 / e.images_per_s for e in self.history) if self.history else 0.0


@dataclass
class Progress:
    """What a fit carries from one completed epoch to the next, besides the model, optimizer and generator."""

    history: list[EpochResult] = field(default_factory=list)
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    waited: int = 0
    stopped_early: bool = False

    @property
    def epoch(self) -> int:
        """The last completed epoch (epochs run from 1 without gaps)."""
        return len(self.history)


@dataclass
class Loop:
    """The live state of a fit: what a checkpoint saves after an epoch and what resuming puts back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    progress: Progress


class Checkpoints(Protocol):
    """What `fit` asks of checkpointing (remote.checkpoints.Checkpointer); the engine knows no storage."""

    def restore(self, loop: Loop) -> None:
        """Put the latest complete checkpoint, if any, into `loop`."""

    def epoch_done(self, loop: Loop, final: bool) -> None:
        """Called after each epoch, the early-stopping decision made; `final` when no epoch follows."""

    def between_batches(self) -> None:
        """Called between training steps; must be cheap."""


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error that says so."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise ParameterError("device=cuda was requested but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device("cpu")


def resolve_bf16(requested: str, device: torch.device) -> bool:
    """`auto` means bf16 on a GPU with native bf16 (Ampere and newer), fp32 elsewhere.

    bf16 on a CPU is slower, not faster; on a T4 (g4dn) torch emulates it, also slower than fp32, so emulation
    does not count as support (`is_bf16_supported()` counts it unless told not to).
    """
    if requested == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "bf16":
        if device.type == "cuda" and not supported:
            raise ParameterError(
                f"precision=bf16: {device_name(device)} has no native bf16 (emulated bf16 is slower than fp32); "
                "use precision=fp32 or auto"
            )
        return True
    return supported


def resolve_compile(requested: str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only: the ~15 s compile pays back within an epoch there, never on a CPU."""
    if requested == "auto":
        return device.type == "cuda"
    return requested == "true"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_everything(seed: int) -> None:
    """Same seed, same run on the CPU (and as close as cuDNN allows on a GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def _autocast(options: FitOptions) -> torch.autocast:
    return torch.autocast(device_type=options.device.type, dtype=torch.bfloat16, enabled=options.bf16)


def _flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, each with probability 1/2, per image."""
    n = images.shape[0]
    masks = (torch.rand((2, n), generator=generator, device=images.device) < 0.5).view(2, n, 1, 1, 1)
    images = torch.where(masks[0], images.flip(3), images)
    return torch.where(masks[1], images.flip(2), images)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, options: FitOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean BCE loss, probabilities) for a resident split, as device tensors."""
    was_training = model.training
    model.eval()
    logits = []
    with torch.no_grad(), _autocast(options):
        for start in range(0, images.shape[0], _EVAL_BATCH):
            batch = images[start : start + _EVAL_BATCH].float()
            logits.append(model(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    joined = torch.cat(logits)
    loss = nn.functional.binary_cross_entropy_with_logits(joined, labels)
    return loss, torch.sigmoid(joined)


def _train_epoch(
    step_model: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    options: FitOptions,
    generator: torch.Generator,
    between_batches: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over full batches in a fresh random order: (loss sum, correct count) on the device, images seen."""
    train_images, train_labels = train
    steps = train_images.shape[0] // options.batch_size  # full batches only: static shapes for cuDNN and compile
    order = torch.randperm(train_images.shape[0], generator=generator, device=options.device)
    loss_sum = torch.zeros((), device=options.device)
    correct = torch.zeros((), device=options.device)
    for step in range(steps):
        index = order[step * options.batch_size : (step + 1) * options.batch_size]
        images = train_images[index].float()
        if options.augment:
            images = _flip(images, generator)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = train_labels[index]
        with _autocast(options):
            logits = step_model(images).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        correct += ((logits.detach() >= 0) == (labels >= 0.5)).sum()
        between_batches()
    return loss_sum / steps, correct, steps * options.batch_size


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    options: FitOptions,
    on_epoch: Callable[[EpochResult], None] = lambda result: None,
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """Train `model` in place (ending with the best epoch's weights) on resident (images, labels) tensors.

    With `checkpoints`, a fit continues after the last checkpointed epoch, as if it had never stopped: `on_epoch`
    is called for the epochs run by this call only.
    """
    n = train[0].shape[0]
    if options.batch_size > n:
        raise ParameterError(f"batch_size {options.batch_size} is larger than the {n} training images; lower it")
    cuda = options.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    # on the device: drawing on the host and copying each step would stall the GPU's queue
    generator = torch.Generator(device=options.device).manual_seed(options.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate, fused=cuda)
    step_model: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(model, dynamic=False) if options.compile else model
    )
    loop = Loop(model, optimizer, generator, Progress(best_state=copy.deepcopy(model.state_dict())))
    if checkpoints is not None:
        checkpoints.restore(loop)
    between_batches = checkpoints.between_batches if checkpoints is not None else lambda: None
    progress = loop.progress
    started = time.perf_counter()
    first = options.epochs + 1 if progress.stopped_early else progress.epoch + 1
    for epoch in range(first, options.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        mean_loss, correct, seen = _train_epoch(step_model, optimizer, train, options, generator, between_batches)
        train_loss = mean_loss.item()  # the epoch's one synchronisation
        train_seconds = time.perf_counter() - epoch_start
        val_loss_t, val_prob = evaluate(model, *val, options)
        val_loss = val_loss_t.item()
        result = EpochResult(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=correct.item() / seen,
            val_loss=val_loss,
            val_accuracy=((val_prob >= 0.5) == (val[1] >= 0.5)).float().mean().item(),
            seconds=time.perf_counter() - epoch_start,
            images_per_s=seen / train_seconds,
        )
        progress.history.append(result)
        on_epoch(result)
        if val_loss < progress.best_loss:
            progress.best_loss, progress.best_epoch, progress.waited = val_loss, epoch, 0
            progress.best_state = copy.deepcopy(model.state_dict())
        else:
            progress.waited += 1
            progress.stopped_early = bool(options.early_stopping_patience) and (
                progress.waited >= options.early_stopping_patience
            )
        if checkpoints is not None:
            checkpoints.epoch_done(loop, final=progress.stopped_early or epoch == options.epochs)
        if progress.stopped_early:
            log.info("early stopping after epoch %d: no better validation loss for %d epochs", epoch, progress.waited)
            break
    model.load_state_dict(progress.best_state)
    elapsed = time.perf_counter() - started
    log.info(
        "trained %d epochs in %.1fs; best epoch %d (val_loss %.4f)",
        len(progress.history),
        elapsed,
        progress.best_epoch,
        progress.best_loss,
    )
    return FitResult(tuple(progress.history), progress.best_epoch, progress.stopped_early)
