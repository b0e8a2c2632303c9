from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from remote import dataset, sources, synthetic
from remote.errors import DataError, ParameterError
from remote.layout import CLASS_NAMES, LABELS

CPU = torch.device("cpu")


# The decode paths (PIL on the CPU, nvjpeg on a GPU) must treat bad files alike; CUDA runs where a GPU is present.
DEVICES = [
    pytest.param(CPU, id="cpu"),
    pytest.param(
        torch.device("cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg decode path)"),
    ),
]


def _load(
    root: Path, split: str = "train_another", max_images: int = 0, device: torch.device = CPU
) -> dataset.LoadedSplit:
    return dataset.load_split(dataset.scan_split(root, split, max_images), 32, device, workers=2)


def test_the_log_names_the_decoder(tiny_root, caplog):
    """Which decoder ran decides the speed by 5x on a GPU: the job's log must say it."""
    with caplog.at_level("INFO", logger="remote.dataset"):
        _load(tiny_root)
    assert "train_another: decoded 24 files with PIL (CPU)" in caplog.text


def test_damage_is_the_positive_class():
    assert LABELS == {"damage": 1, "no_damage": 0}
    assert CLASS_NAMES[1] == "damage"


def test_files_get_their_folder_label(tiny_root):
    files = dataset.scan_split(tiny_root, "test")
    for path, label in zip(files.paths, files.labels, strict=True):
        assert label == (1 if path.parent.name == "damage" else 0)
    # synthetic damage carries brown flood water: less green than no_damage, so labels and pixels agree
    loaded = _load(tiny_root, "test")
    green_minus_red = (loaded.images[:, 1].float() - loaded.images[:, 0].float()).mean(dim=(1, 2))
    assert green_minus_red[loaded.labels == 1].mean() < green_minus_red[loaded.labels == 0].mean()


def test_loaded_split_layout_and_balance(tiny_root):
    loaded = _load(tiny_root)
    assert loaded.images.shape == (24, 3, 32, 32)
    assert loaded.images.dtype == torch.uint8
    assert loaded.images.is_contiguous(memory_format=torch.channels_last)
    assert loaded.class_counts() == {"damage": 12, "no_damage": 12}
    assert (loaded.skipped, loaded.resized) == (0, 0)


def test_optional_unbalanced_split_is_found(tiny_root):
    assert set(dataset.scan(tiny_root)) == {"train_another", "validation_another", "test", "test_another"}


def test_max_images_cuts_classes_in_proportion(tiny_root):
    files = dataset.scan_split(tiny_root, "test_another", max_images=3)
    assert sorted(files.labels) == [0, 1, 1]


def test_missing_split_is_an_error(tiny_copy):
    shutil.rmtree(tiny_copy / "test")
    with pytest.raises(DataError, match="split folder 'test' is missing"):
        dataset.scan(tiny_copy)


def test_missing_class_is_an_error(tiny_copy):
    shutil.rmtree(tiny_copy / "validation_another" / "damage")
    with pytest.raises(DataError, match="class folder validation_another/damage is missing"):
        dataset.scan(tiny_copy)


def test_empty_class_is_an_error(tiny_copy):
    folder = tiny_copy / "test" / "no_damage"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(DataError, match="class folder test/no_damage is empty"):
        dataset.scan(tiny_copy)


@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_and_non_image_files_are_skipped_and_counted(tiny_copy, device):
    folder = tiny_copy / "train_another" / "damage"
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated JPEG
    (folder / "notes.txt").write_text("not an image")
    loaded = _load(tiny_copy, device=device)
    assert loaded.skipped == 2
    assert loaded.class_counts() == {"damage": 11, "no_damage": 12}


@pytest.mark.parametrize("device", DEVICES)
def test_a_class_with_no_readable_image_is_an_error(tiny_copy, device):
    for path in (tiny_copy / "test" / "damage").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="split 'test' has no readable damage image"):
        _load(tiny_copy, "test", device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_other_sizes_are_resized_and_grayscale_converted(tiny_copy, device):
    folder = tiny_copy / "train_another" / "no_damage"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "big.png")
    Image.new("L", (32, 32), 128).save(folder / "gray.jpeg")
    loaded = _load(tiny_copy, device=device)
    assert loaded.resized == 1
    assert loaded.images.shape == (26, 3, 32, 32)


def test_synthetic_is_deterministic_and_seeded(tmp_path):
    spec = synthetic.parse_synthetic_uri("synthetic://?train_per_class=2&val_per_class=1&test_per_class=1&size=32")

    def digest(root: Path) -> str:
        files = sorted(p for p in root.rglob("*.jpeg"))
        return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()

    synthetic.generate(spec, tmp_path / "a")
    synthetic.generate(spec, tmp_path / "b")
    synthetic.generate(synthetic.SyntheticSpec(**{**spec.__dict__, "seed": 1}), tmp_path / "c")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert len(list((tmp_path / "a" / "train_another" / "damage").iterdir())) == 2


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("synthetic://?colour=red", "unknown synthetic option 'colour'"),
        ("synthetic://?seed=x", "seed must be an integer"),
        ("synthetic://?size=4", "size must be between 16"),
    ],
)
def test_bad_synthetic_options(uri, message):
    with pytest.raises(ParameterError, match=message):
        synthetic.parse_synthetic_uri(uri)


def test_synthetic_uri_is_cached(tmp_path):
    uri = "synthetic://?train_per_class=1&val_per_class=1&test_per_class=1&test_another_damage=0&test_another_no_damage=0&size=16"
    first = sources.resolve(uri, tmp_path)
    stamp = (first / "test" / "damage" / "damage_000000.jpeg").stat().st_mtime_ns
    assert sources.resolve(uri, tmp_path) == first
    assert (first / "test" / "damage" / "damage_000000.jpeg").stat().st_mtime_ns == stamp
    assert not (first / "test_another").exists()


def test_zip_with_a_top_level_folder(tiny_root, tmp_path):
    archive = tmp_path / "hurricane.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in tiny_root.rglob("*.jpeg"):
            bundle.write(path, Path("hurricane") / path.relative_to(tiny_root))
    root = sources.resolve(str(archive), tmp_path / "cache")
    assert root.name == "hurricane"
    assert len(dataset.scan(root)["train_another"].paths) == 24


def test_bad_local_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.resolve(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "data.tar").write_bytes(b"x")
    with pytest.raises(DataError, match=r"is not a \.zip"):
        sources.resolve(str(tmp_path / "data.tar"), tmp_path)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip file"):
        sources.resolve(str(tmp_path / "bad.zip"), tmp_path)
    with pytest.raises(DataError, match="unsupported data uri scheme 'gs'"):
        sources.resolve("gs://bucket/data", tmp_path)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 with an empty bucket named "data"; yields its client."""
    import boto3

    from tests.support.aws_cloud import in_process_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with in_process_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        yield client


def test_s3_prefix_is_downloaded_once_and_cached(tiny_root, tmp_path, s3):
    for path in tiny_root.rglob("*.jpeg"):
        s3.upload_file(str(path), "data", f"hurricane/{path.relative_to(tiny_root)}")
    s3.put_object(Bucket="data", Key="hurricane-old/train/damage/stale.jpeg", Body=b"beside the folder")
    root = sources.resolve("s3://data/hurricane", tmp_path)
    assert len(dataset.scan(root)["test"].paths) == 8
    assert not list(tmp_path.rglob("stale.jpeg"))  # a sibling prefix is not part of the folder
    s3.delete_object(Bucket="data", Key="hurricane/test/damage/damage_000000.jpeg")
    assert sources.resolve("s3://data/hurricane", tmp_path) == root  # the cached copy is kept
    with pytest.raises(DataError, match="no objects under s3://data/missing"):
        sources.resolve("s3://data/missing", tmp_path)


def _files_outside(folder: Path, top: Path) -> list[Path]:
    return [path for path in top.rglob("*") if path.is_file() and not path.is_relative_to(folder)]


# Keys a hostile or careless bucket may hold; none may be written, and the error names the key.
HOSTILE_KEYS = [
    pytest.param("p/../../etc/x", "'..'", id="dot-dot"),
    pytest.param("p/../../../../escaped", "'..'", id="dot-dot-out-of-the-cache"),
    pytest.param("p/a/./b", "'.'", id="dot"),
    pytest.param("p/a\\b", r"'a\\\\b'", id="backslash"),
    pytest.param("p//ABS", "''", id="absolute"),
]


@pytest.mark.parametrize(("key", "segment"), HOSTILE_KEYS)
def test_s3_keys_that_would_leave_the_cache_are_refused(tmp_path, s3, key, segment):
    cache = tmp_path / "cache"
    # "p//ABS" would be written at /ABS: point it under tmp_path so a regression stays inside the test's folder.
    key = key.replace("//ABS", f"/{tmp_path}/abs-escape")
    s3.put_object(Bucket="data", Key="p/train/ok.jpeg", Body=b"fine")
    s3.put_object(Bucket="data", Key=key, Body=b"hostile")
    with pytest.raises(
        DataError, match=rf"s3 key {re.escape(repr(key))} in bucket data has the unsafe path segment {segment}"
    ):
        sources.resolve("s3://data/p", cache)
    assert _files_outside(cache / "s3" / "data" / "p", tmp_path) == []


def test_s3_key_equal_to_the_prefix_is_refused(tmp_path, s3):
    s3.put_object(Bucket="data", Key="p/train/ok.jpeg", Body=b"fine")
    s3.put_object(Bucket="data", Key="p", Body=b"takes the folder's place")
    with pytest.raises(DataError, match=r"s3 key 'p' in bucket data is the prefix itself"):
        sources.resolve("s3://data/p", tmp_path)
    assert _files_outside(tmp_path / "s3" / "data" / "p", tmp_path) == []


def test_s3_single_zip_with_a_hostile_key_is_refused(tmp_path, s3):
    cache = tmp_path / "cache"
    s3.put_object(Bucket="data", Key="p/../../../escaped.zip", Body=b"PK")
    with pytest.raises(
        DataError, match=r"s3 key 'p/\.\./\.\./\.\./escaped\.zip' in bucket data has the unsafe path segment '\.\.'"
    ):
        sources.resolve("s3://data/p", cache)
    assert _files_outside(cache / "s3" / "data", tmp_path) == []


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://data/p/../../..", r"the prefix of s3://data/p/\.\./\.\./\.\. has the unsafe path segment '\.\.'"),
        ("s3://data/p//q", r"the prefix of s3://data/p//q has the unsafe path segment ''"),
        ("s3://../p", r"'\.\.' is not a bucket name"),
    ],
)
def test_s3_uri_that_would_leave_the_cache_is_refused(tmp_path, s3, uri, message):
    with pytest.raises(DataError, match=message):
        sources.resolve(uri, tmp_path)


@pytest.mark.parametrize("member", ["../../escaped.txt", "/abs/escaped.txt", "data/./x.txt", "data\\x.txt"])
def test_zip_members_that_would_leave_the_cache_are_refused(tmp_path, member):
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data/train/ok.jpeg", b"fine")
        bundle.writestr(member, b"hostile")
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError, match=rf"zip member {re.escape(repr(member))} of {re.escape(str(archive))} has the unsafe"
    ):
        sources.resolve(str(archive), cache)
    assert not list(cache.rglob("*.txt"))
    assert not (tmp_path / "escaped.txt").exists()


def test_credentials_never_reach_logs():
    assert sources.redact_uri("https://user:secret@host:9000/data.zip") == "https://host:9000/data.zip"
    assert sources.redact_uri("s3://bucket/prefix") == "s3://bucket/prefix"
