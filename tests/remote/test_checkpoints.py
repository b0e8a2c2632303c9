"""Checkpoints and resuming (remote/checkpoints.py): a fit stopped after an epoch and resumed ends exactly as one
that never stopped; broken checkpoints are skipped; the checkpoint-now request; a store that refuses writes."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from remote import checkpoints, dataset, engine
from remote.checkpoint_store import LocalStore, Store
from remote.errors import TrainingError
from remote.models import DamageCNN

CPU = torch.device("cpu")
SEED = 5


class Interrupted(Exception):
    """Stands for the instance going away."""


@pytest.fixture(scope="module")
def splits(tiny_root: Path) -> dict[str, dataset.LoadedSplit]:
    return {name: dataset.load_split(files, 32, CPU, 0) for name, files in dataset.scan(tiny_root).items()}


def _fit(
    splits: dict[str, dataset.LoadedSplit],
    checkpointer: checkpoints.Checkpointer | None,
    *,
    epochs: int = 4,
    patience: int = 0,
    stop_in_epoch: int = 0,
    flipped: bool = False,
    on_epoch: Callable[[int], object] = lambda epoch: None,
) -> tuple[engine.FitResult, dict[str, torch.Tensor]]:
    """A fresh fit as the job makes one (seeded, then the model built); `stop_in_epoch` interrupts it as that epoch
    ends, before its checkpoint. `flipped` validates on the training images with their labels flipped, so that
    validation loss rises and early stopping happens."""
    engine.seed_everything(SEED)
    model = engine.prepare_model(DamageCNN(32, (8, 16), 16, 0.2), CPU)
    options = engine.FitOptions(
        epochs=epochs, batch_size=4, learning_rate=1e-3, device=CPU, bf16=False, early_stopping_patience=patience
    )
    train = (splits["train_another"].images, splits["train_another"].labels)
    val = (
        (train[0], 1 - train[1])
        if flipped
        else (splits["validation_another"].images, splits["validation_another"].labels)
    )

    def epoch_ended(result: engine.EpochResult) -> None:
        on_epoch(result.epoch)
        if result.epoch == stop_in_epoch:
            raise Interrupted

    result = engine.fit(model, train, val, options, epoch_ended, checkpointer)
    return result, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _timeless(result: engine.FitResult) -> tuple[object, ...]:
    """What must match between runs: everything but the wall-clock figures."""
    return (
        [dataclasses.replace(epoch, seconds=0.0, images_per_s=0.0) for epoch in result.history],
        result.best_epoch,
        result.stopped_early,
    )


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _checkpointer(store: Store | None, tags: dict[str, str]) -> checkpoints.Checkpointer:
    """Checkpoints after every epoch; the resumes counted so far read from the run's tags, as the job does."""
    return checkpoints.Checkpointer(store, 0.0, tags.__setitem__, resumes=int(tags.get(checkpoints.TAG_RESUMES, 0)))


def test_a_fit_stopped_after_epoch_2_and_resumed_ends_bit_identical(splits, tmp_path):
    """The key property: same history, best epoch and final weights as the run that never stopped (on a CPU)."""
    whole, whole_weights = _fit(splits, None)
    store, tags = LocalStore(tmp_path / "run"), dict[str, str]()
    with pytest.raises(Interrupted):
        _fit(splits, _checkpointer(store, tags), stop_in_epoch=3)
    assert checkpoints.complete_epochs(store.keys()) == [2, 1]
    assert tags == {}

    ran: list[int] = []
    resumed, resumed_weights = _fit(splits, _checkpointer(store, tags), on_epoch=ran.append)

    assert ran == [3, 4], "the resumed fit repeats or skips an epoch"
    assert _timeless(resumed) == _timeless(whole)
    assert _same_weights(resumed_weights, whole_weights)
    assert tags == {checkpoints.TAG_RESUMED_FROM: "2", checkpoints.TAG_RESUMES: "1"}
    # Only the last two complete checkpoints are kept; the last epoch is saved too.
    assert sorted(store.keys()) == [
        "ckpt-000003/manifest.json",
        "ckpt-000003/state.pt",
        "ckpt-000004/manifest.json",
        "ckpt-000004/state.pt",
    ]


def test_early_stopping_state_survives_a_resume(splits, tmp_path):
    """Stopped while early stopping is counting (one epoch past the best), the resumed fit stops at the same epoch
    and restores the same best weights; started once more after that, it trains nothing."""
    whole, whole_weights = _fit(splits, None, epochs=12, patience=2, flipped=True)
    assert whole.stopped_early and len(whole.history) == whole.best_epoch + 2
    store, tags = LocalStore(tmp_path / "run"), dict[str, str]()
    with pytest.raises(Interrupted):
        _fit(
            splits, _checkpointer(store, tags), epochs=12, patience=2, flipped=True, stop_in_epoch=whole.best_epoch + 2
        )

    resumed, resumed_weights = _fit(splits, _checkpointer(store, tags), epochs=12, patience=2, flipped=True)
    assert _timeless(resumed) == _timeless(whole)
    assert _same_weights(resumed_weights, whole_weights)

    ran: list[int] = []
    again, again_weights = _fit(
        splits, _checkpointer(store, tags), epochs=12, patience=2, flipped=True, on_epoch=ran.append
    )
    assert ran == []
    assert _timeless(again) == _timeless(whole) and _same_weights(again_weights, whole_weights)
    assert tags[checkpoints.TAG_RESUMES] == "2"


def _two_checkpoints(splits, tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "run")
    _fit(splits, _checkpointer(store, {}), epochs=3)
    assert checkpoints.complete_epochs(store.keys()) == [3, 2]
    return store


def _manifest(store: LocalStore, epoch: int) -> dict[str, object]:
    return dict(json.loads(store.get(f"ckpt-{epoch:06d}/manifest.json")))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda store: (store.root / "ckpt-000003/state.pt").unlink(),
            "its object ckpt-000003/state.pt cannot be read",
        ),
        (lambda store: store.put("ckpt-000003/state.pt", b"x" * 10), "does not match the manifest's size and sha256"),
        (
            lambda store: (
                store.put("ckpt-000003/state.pt", b"not a torch file"),
                store.put(
                    "ckpt-000003/manifest.json",
                    json.dumps(checkpoints.manifest(3, b"not a torch file")).encode(),
                ),
            ),
            "ckpt-000003 in",
        ),
        (lambda store: store.put("ckpt-000003/manifest.json", b"{truncated"), "ckpt-000003 in"),
    ],
    ids=["missing object", "sha256 mismatch", "unreadable torch file", "corrupt manifest"],
)
def test_a_broken_checkpoint_is_skipped_for_the_previous_one(splits, tmp_path, caplog, damage, reason):
    store = _two_checkpoints(splits, tmp_path)
    damage(store)
    with caplog.at_level(logging.WARNING, logger="remote.checkpoints"):
        state = checkpoints.latest(store)
    assert state is not None and state["epoch"] == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith("checkpoint ckpt-000003 in ") and "skipped" in line and "trying the previous one" in line
    assert reason in line


def test_a_checkpoint_without_its_manifest_is_incomplete_and_pruned_later(splits, tmp_path):
    store = _two_checkpoints(splits, tmp_path)
    store.put("ckpt-000004/state.pt", b"written, then the instance went")
    assert checkpoints.latest(store)["epoch"] == 3  # type: ignore[index]
    assert checkpoints.stale_keys(["ckpt-000001/state.pt", *store.keys()]) == ["ckpt-000001/state.pt"]
    # Pruning deletes manifests first: a prune cut short leaves nothing that looks complete.
    keys = [
        "ckpt-000001/state.pt",
        "ckpt-000001/manifest.json",
        "ckpt-000002/manifest.json",
        "ckpt-000003/manifest.json",
    ]
    assert checkpoints.stale_keys(keys) == ["ckpt-000001/manifest.json", "ckpt-000001/state.pt"]


def test_a_checkpoint_request_saves_the_last_completed_epoch_at_once(splits, tmp_path, monkeypatch, caplog):
    """A request during epoch 3 (mid-epoch cannot be resumed) saves epoch 2 before epoch 3 ends, tags the run with
    the notice, is acted on once (renamed), and from then on every epoch is saved."""
    monkeypatch.setattr(checkpoints, "_REQUEST_POLL_S", 0.0)
    request = tmp_path / "checkpoint-request.json"
    store, tags = LocalStore(tmp_path / "run"), dict[str, str]()
    checkpointer = checkpoints.Checkpointer(store, 60.0, tags.__setitem__, request)
    notice = {"action": "terminate", "time": "2026-12-07T07:00:00Z"}

    def the_watcher(epoch: int) -> None:
        if epoch == 2:
            request.write_text(json.dumps(notice))

    with caplog.at_level(logging.INFO), pytest.raises(Interrupted):
        _fit(splits, checkpointer, stop_in_epoch=3, on_epoch=the_watcher)
    assert checkpoints.complete_epochs(store.keys()) == [2]  # 60 minutes were not up: only the request saved it
    assert json.loads(tags[checkpoints.TAG_SPOT_NOTICE]) == notice
    assert not request.exists() and request.with_name(request.name + ".handled").exists()
    assert any("checkpoint requested" in r.getMessage() for r in caplog.records)
    # Acted on once: nothing more is tagged, and the epochs after it are saved each.
    tags.clear()
    checkpointer.between_batches()
    assert tags == {}


def test_a_request_without_checkpoints_or_with_garbage_is_still_tagged(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_REQUEST_POLL_S", 0.0)
    request = tmp_path / "request"
    request.write_bytes(b"\xff not json")
    monkeypatch.setenv(checkpoints.REQUEST_ENV, str(request))
    tags: dict[str, str] = {}
    checkpointer = checkpoints.Checkpointer.from_environment(None, 10.0, tags.__setitem__)
    checkpointer.between_batches()
    assert tags == {checkpoints.TAG_SPOT_NOTICE: "unreadable"}
    assert checkpoints.read_notice(b"[1, 2]") == "unreadable"
    assert checkpoints.read_notice(b'{"time": "t", "action": "stop"}') == '{"action":"stop","time":"t"}'
    monkeypatch.delenv(checkpoints.REQUEST_ENV)
    assert checkpoints.Checkpointer.from_environment(None, 10.0, tags.__setitem__).request is None


def test_checkpoints_are_written_when_due_and_at_the_end(splits, tmp_path):
    """Every `minutes` (at an epoch's end) and after the last epoch, whatever the clock says."""
    minutes = iter(range(100))  # a minute passes between two looks at the clock
    store = LocalStore(tmp_path / "run")
    checkpointer = checkpoints.Checkpointer(
        store, 2.0, dict[str, str]().__setitem__, clock=lambda: 60.0 * next(minutes)
    )
    _fit(splits, checkpointer, epochs=3)
    assert checkpoints.complete_epochs(store.keys()) == [3, 2]


def test_a_checkpoint_of_another_model_stops_the_job_with_the_fix(splits, tmp_path):
    """The same run id with other parameters: neither resumed into nor silently written over."""
    store = _two_checkpoints(splits, tmp_path)
    model = DamageCNN(32, (8, 8), 16, 0.2)
    loop = engine.Loop(model, torch.optim.Adam(model.parameters()), torch.Generator(), engine.Progress())
    with pytest.raises(TrainingError, match=r"the checkpoint of epoch 3 in .* does not fit this run"):
        _checkpointer(store, {}).restore(loop)
