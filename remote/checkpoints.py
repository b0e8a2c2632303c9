"""Checkpoints of a fit after a completed epoch, and resuming from the latest complete one (spot recovery).

A checkpoint is one torch file with everything the loop carries between epochs (engine.Loop): model and optimizer
state, the shuffling/augmentation generator, the global RNGs (python, numpy, torch, CUDA), the early-stopping state
with the best weights so far, and the history. There is no AMP state to save: bf16 autocast needs no GradScaler.

Layout under the run's prefix: `ckpt-000003/state.pt` written first, then `ckpt-000003/manifest.json` (epoch, object
key, size, sha256), so a checkpoint without its manifest is incomplete and never read. After a manifest is written
all but the last two complete checkpoints are deleted. Resuming tries the complete ones newest first and skips any
whose object is missing, of another size or digest, or unreadable.

Only completed epochs are checkpointed: a checkpoint-now request (the spot-interruption watcher's file) saves the
last completed epoch at once if it is not saved yet, and from then on every epoch is saved. A checkpoint that cannot
be written stops checkpointing for the rest of the run with a warning and a tag: training is worth more than its
checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from remote.checkpoint_store import Store
from remote.engine import EpochResult, Loop, Progress
from remote.errors import TrainingError

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
REQUEST_ENV = "EC2_TRAINER_CHECKPOINT_REQUEST"
TAG_RESUMED_FROM = "ec2_trainer.resumed_from_epoch"
TAG_RESUMES = "ec2_trainer.resumes"
TAG_ERROR = "ec2_trainer.checkpoint_error"
TAG_SPOT_NOTICE = "ec2_trainer.spot_notice"
_NAME = re.compile(r"ckpt-(\d{6})")
_REQUEST_POLL_S = 1.0  # a file check per second is free; every batch would be thousands a second on a GPU
_NOTICE_MAX_CHARS = 500
_S3_FIX = (
    "check that the instance profile allows s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on the "
    "checkpoint prefix (config/iam/instance.json)"
)
_FOLDER_FIX = "check that the folder is writable and its disk has room"
_OFF = "or pass checkpoint_uri= (empty) to train without checkpoints"

Tagger = Callable[[str, str], object]  # mlflow.set_tag


def checkpoint_name(epoch: int) -> str:
    return f"ckpt-{epoch:06d}"


def snapshot(loop: Loop) -> dict[str, Any]:
    """Everything needed to continue `loop` exactly, as tensors and plain values (loadable with weights_only)."""
    kind, keys, *numpy_rest = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    progress = loop.progress
    return {
        "format": FORMAT,
        "epoch": progress.epoch,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "generator": loop.generator.get_state(),
        "rng": {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), *numpy_rest],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "progress": {
            "history": [asdict(result) for result in progress.history],
            "best_loss": progress.best_loss,
            "best_epoch": progress.best_epoch,
            "best_state": progress.best_state,
            "waited": progress.waited,
            "stopped_early": progress.stopped_early,
        },
    }


def apply(state: dict[str, Any], loop: Loop) -> None:
    """Put a snapshot back into `loop` (its model, optimizer and generator in place)."""
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.generator.set_state(state["generator"])
    rng = state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved = state["progress"]
    loop.progress = Progress(
        history=[EpochResult(**result) for result in saved["history"]],
        best_loss=saved["best_loss"],
        best_epoch=saved["best_epoch"],
        best_state=saved["best_state"],
        waited=saved["waited"],
        stopped_early=saved["stopped_early"],
    )


def encode(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def decode(blob: bytes) -> dict[str, Any]:
    """The snapshot in `blob`, on the CPU (RNG states must be CPU tensors; load_state_dict copies to the device).

    weights_only: a checkpoint is data read back from a bucket, so it is never unpickled as arbitrary objects.
    """
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a format {FORMAT} checkpoint")
    return state


def manifest(epoch: int, blob: bytes) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "epoch": epoch,
        "object": f"{checkpoint_name(epoch)}/{STATE_FILE}",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def complete_epochs(keys: list[str]) -> list[int]:
    """The epochs with a manifest under the run's prefix, newest first."""
    found = {int(m.group(1)) for key in keys if (m := _NAME.fullmatch(key.removesuffix(f"/{MANIFEST_FILE}")))}
    return sorted((epoch for epoch in found if f"{checkpoint_name(epoch)}/{MANIFEST_FILE}" in keys), reverse=True)


def stale_keys(keys: list[str], keep: int = KEEP) -> list[str]:
    """The keys of every checkpoint older than the newest `keep` complete ones, manifests first (so that a prune
    cut short leaves nothing that looks complete)."""
    complete = complete_epochs(keys)
    if len(complete) < keep:
        return []
    oldest_kept = complete[keep - 1]
    old = [key for key in keys if (m := _NAME.match(key)) and int(m.group(1)) < oldest_kept]
    return sorted(old, key=lambda key: (not key.endswith(MANIFEST_FILE), key))


def write(store: Store, epoch: int, blob: bytes) -> None:
    """Write one checkpoint, object first and manifest last, then prune the older ones."""
    name = checkpoint_name(epoch)
    store.put(f"{name}/{STATE_FILE}", blob)
    store.put(f"{name}/{MANIFEST_FILE}", json.dumps(manifest(epoch, blob), indent=1).encode())
    for key in stale_keys(store.keys()):
        store.delete(key)


def read(store: Store, epoch: int) -> dict[str, Any]:
    """The snapshot of one complete checkpoint; raises ValueError (or the store's error) saying what is wrong."""
    name = checkpoint_name(epoch)
    described = json.loads(store.get(f"{name}/{MANIFEST_FILE}"))
    if described.get("object") != f"{name}/{STATE_FILE}" or described.get("epoch") != epoch:
        raise ValueError(f"its manifest names {described.get('object')!r} for epoch {described.get('epoch')!r}")
    try:
        blob = store.get(described["object"])
    except Exception as exc:  # a missing file, botocore's NoSuchKey: the same meaning here
        raise ValueError(f"its object {described['object']} cannot be read ({_reason(exc)})") from None
    if len(blob) != described.get("size") or hashlib.sha256(blob).hexdigest() != described.get("sha256"):
        raise ValueError(f"its object {described['object']} does not match the manifest's size and sha256")
    state = decode(blob)
    if state["epoch"] != epoch:
        raise ValueError(f"its object holds epoch {state['epoch']}")
    return state


def latest(store: Store) -> dict[str, Any] | None:
    """The newest complete, intact checkpoint's snapshot; a broken one is logged and the previous one tried."""
    for epoch in complete_epochs(store.keys()):
        try:
            return read(store, epoch)
        except Exception as exc:  # a torch load error, bad JSON, a missing object: all mean "try the previous one"
            log.warning(
                "checkpoint %s in %s skipped: %s; trying the previous one", checkpoint_name(epoch), store.location, exc
            )
    return None


def read_notice(raw: bytes) -> str:
    """The spot notice's tag value: the watcher's small JSON object, compact, or "unreadable"."""
    try:
        notice = json.loads(raw)
    except ValueError:
        return "unreadable"
    if not isinstance(notice, dict):
        return "unreadable"
    text = json.dumps(notice, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= _NOTICE_MAX_CHARS else "unreadable"


class Checkpointer:
    """engine.Checkpoints for one run: when to write, what to do when writing fails, and the checkpoint-now request.

    `store` None means checkpoints are off; the request is still acted on (tagged and logged).
    """

    def __init__(
        self,
        store: Store | None,
        minutes: float,
        tag: Tagger,
        request: Path | None = None,
        resumes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.interval_s = minutes * 60
        self.tag = tag
        self.request = request
        self.resumes = resumes
        self.resumed_from = 0
        self._clock = clock
        self._last_write = clock()
        self._next_poll = 0.0
        self._urgent = False
        # The last completed epoch's encoded snapshot, kept while a request may come: a request arrives mid-epoch,
        # when the model has moved on, and only a completed epoch can be resumed from.
        self._pending: tuple[int, bytes] | None = None
        self._written = 0

    @classmethod
    def from_environment(cls, store: Store | None, minutes: float, tag: Tagger, resumes: int = 0) -> Checkpointer:
        """With the request file named by $EC2_TRAINER_CHECKPOINT_REQUEST (unset: no request is watched)."""
        path = os.environ.get(REQUEST_ENV, "").strip()
        return cls(store, minutes, tag, Path(path) if path else None, resumes)

    def restore(self, loop: Loop) -> None:
        if self.store is None:
            return
        try:
            state = latest(self.store)
        except Exception as exc:  # listing failed: writing would clobber what could not be read, so write nothing
            self._fail("list", exc)
            return
        if state is None:
            log.info("no checkpoint in %s: training from the first epoch", self.store.location)
            return
        try:
            apply(state, loop)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise TrainingError(
                f"the checkpoint of epoch {state['epoch']} in {self.store.location} does not fit this run ({exc}); "
                "were the run's parameters changed? Pass another checkpoint_uri, or delete that prefix to start over"
            ) from None
        self.resumed_from = self._written = loop.progress.epoch
        self.resumes += 1
        self.tag(TAG_RESUMED_FROM, str(self.resumed_from))
        self.tag(TAG_RESUMES, str(self.resumes))
        log.info("resumed from the checkpoint of epoch %d in %s", self.resumed_from, self.store.location)

    def epoch_done(self, loop: Loop, final: bool) -> None:
        if self.store is None:
            return
        epoch = loop.progress.epoch
        due = final or self._urgent or self._clock() - self._last_write >= self.interval_s
        if due or self.request is not None:
            self._pending = (epoch, encode(snapshot(loop)))
        if due:
            self._write_pending()

    def between_batches(self) -> None:
        if self.request is None:
            return
        now = self._clock()
        if now < self._next_poll:
            return
        self._next_poll = now + _REQUEST_POLL_S
        try:
            raw = self.request.read_bytes()[: 4 * _NOTICE_MAX_CHARS]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("checkpoint request %s cannot be read (%s); acting on it anyway", self.request, exc)
            raw = b""
        try:
            self.request.replace(self.request.with_name(self.request.name + ".handled"))  # so that it acts once
        except OSError as exc:
            log.warning(
                "checkpoint request %s cannot be renamed (%s); no further request is watched", self.request, exc
            )
            self.request = None  # it would trigger again every second
        notice = read_notice(raw)
        self.tag(TAG_SPOT_NOTICE, notice)
        self._urgent = True
        if self.store is None:
            log.warning("checkpoint requested (%s), but checkpoints are off: nothing to save", notice)
        elif self._pending is None:
            log.warning("checkpoint requested (%s) before the first epoch ended: each epoch is saved from now", notice)
        else:
            log.warning(
                "checkpoint requested (%s): epoch %d saved now if not yet, then every epoch", notice, self._pending[0]
            )
            self._write_pending()

    def _write_pending(self) -> None:
        if self.store is None or self._pending is None or self._pending[0] <= self._written:
            return
        epoch, blob = self._pending
        try:
            write(self.store, epoch, blob)
        except Exception as exc:  # botocore's errors or an OSError: either way, the fix is the same
            self._fail(f"write epoch {epoch} to", exc)
            return
        self._written, self._last_write = epoch, self._clock()
        log.info("checkpoint of epoch %d written to %s (%.1f MB)", epoch, self.store.location, len(blob) / 1e6)

    def _fail(self, what: str, exc: Exception) -> None:
        location = self.store.location if self.store else ""
        reason = _reason(exc)
        log.warning(
            "checkpoint: cannot %s %s: %s; training goes on WITHOUT checkpoints (an interruption restarts it from the "
            "first epoch); %s, %s",
            what,
            location,
            reason,
            _S3_FIX if location.startswith("s3://") else _FOLDER_FIX,
            _OFF,
        )
        self.tag(TAG_ERROR, f"cannot {what} {location}: {reason}"[:_NOTICE_MAX_CHARS])
        self.store, self._pending = None, None


def _reason(exc: Exception) -> str:
    """botocore's error code and message (never the request's credentials), or the exception's own text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"
