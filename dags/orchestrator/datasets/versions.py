"""Dataset versions under a prefix, from an S3 listing: pure functions, no I/O.

A version is a folder `<prefix><version>/` holding the dataset layout (or one `.zip` of it). It is complete once its
marker object (`datasets.marker`, Hadoop/Spark's `_SUCCESS` by default) exists: the uploader writes it last, so a
half-uploaded version has none. Its identity is its objects' keys (relative to the folder), ETags and sizes, the
marker left out: the same data uploaded again, under any name, has the same digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import OrchestratorError
from orchestrator.pathnames import SEGMENT_RULE, unsafe_segment

# MLflow run tags naming the data a training read (set by the train task, searched by ec2_retrain).
URI_TAG = "dataset.uri"
VERSION_TAG = "dataset.version"
DIGEST_TAG = "dataset.digest"
OBJECTS_TAG = "dataset.objects"
BYTES_TAG = "dataset.bytes"
ZIP_ETAG_TAG = "dataset.zip_etag"


class DatasetError(OrchestratorError):
    """The data a run asks for is missing or incomplete; the message says what to do. No retry fixes it."""

    terminal = True


class IncompleteVersionError(DatasetError):
    """A dataset version's marker is not there (yet): it is still uploading, or its uploader failed."""


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str
    size: int
    modified: float  # LastModified, epoch seconds

    @classmethod
    def from_listing(cls, item: Mapping[str, Any]) -> S3Object:
        """One `Contents` entry of ListObjectsV2."""
        return cls(str(item["Key"]), str(item["ETag"]).strip('"'), int(item["Size"]), item["LastModified"].timestamp())


@dataclass(frozen=True)
class DatasetVersion:
    """The exact data a training reads: `uri` (a version's folder, or its zip) and every object under it."""

    uri: str
    name: str  # the version's folder name under datasets.uri; "" for data elsewhere
    objects: tuple[S3Object, ...]  # keys relative to the folder (the zip: its file name), sorted, no marker
    completed_at: float | None = None  # the marker's LastModified

    @property
    def zip_etag(self) -> str | None:
        return self.objects[0].etag if self.uri.endswith(".zip") and len(self.objects) == 1 else None

    def manifest(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "version": self.name,
            "digest": self.digest,
            "objects": [{"key": o.key, "etag": o.etag, "size": o.size} for o in self.objects],
        }

    @property
    def digest(self) -> str:
        """sha256 of the sorted (relative key, ETag, size) list: equal digests, equal data."""
        rows = sorted([o.key, o.etag, o.size] for o in self.objects)
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()

    def tags(self) -> dict[str, str]:
        tags = {
            URI_TAG: self.uri,
            VERSION_TAG: self.name,
            DIGEST_TAG: self.digest,
            OBJECTS_TAG: str(len(self.objects)),
            BYTES_TAG: str(sum(o.size for o in self.objects)),
        }
        if self.zip_etag:
            tags[ZIP_ETAG_TAG] = self.zip_etag
        return tags


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of an s3:// URI."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise DatasetError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parts.netloc, parts.path.lstrip("/")


def version_name(data_uri: str, datasets_uri: str) -> str | None:
    """The version folder `data_uri` lies in when it is under `datasets_uri`, else None."""
    if not datasets_uri or not data_uri.startswith(datasets_uri):
        return None
    name = data_uri[len(datasets_uri) :].split("/", 1)[0]
    return name or None


def version_folder(key: str, prefix: str) -> tuple[str, str] | None:
    """(version name, key inside its folder) of an object key under a datasets prefix; None for a key that is not in
    a version's folder, or whose folder name the job would refuse ('.', '..', ...: remote/pathnames.py), so such a
    folder is never offered as a version."""
    name, sep, rest = key[len(prefix) :].partition("/")
    if key.startswith(prefix) and sep and rest and unsafe_segment(name) is None:
        return name, rest
    return None


def complete_versions(objects: Iterable[S3Object], datasets_uri: str, marker: str) -> list[DatasetVersion]:
    """Every version under `datasets_uri` whose marker exists, from a listing of that prefix (full keys)."""
    bucket, prefix = split_s3_uri(datasets_uri)
    folders: dict[str, list[S3Object]] = {}
    for obj in objects:
        found = version_folder(obj.key, prefix)
        if found is not None:
            name, rest = found
            folders.setdefault(name, []).append(S3Object(rest, obj.etag, obj.size, obj.modified))
    versions = []
    for name, inside in folders.items():
        done = next((o for o in inside if o.key == marker), None)
        if done is not None:
            versions.append(_version(f"s3://{bucket}/{prefix}{name}/", name, inside, marker, done.modified))
    return sorted(versions, key=lambda v: v.name)


def incomplete_versions(objects: Iterable[S3Object], datasets_uri: str, marker: str) -> list[str]:
    """The version folders under `datasets_uri` that have objects but no marker (uploading, or abandoned)."""
    _, prefix = split_s3_uri(datasets_uri)
    seen: dict[str, bool] = {}
    for obj in objects:
        found = version_folder(obj.key, prefix)
        if found is not None:
            name, rest = found
            seen[name] = seen.get(name, False) or rest == marker
    return sorted(name for name, done in seen.items() if not done)


def latest(versions: Iterable[DatasetVersion]) -> DatasetVersion | None:
    """The most recently completed version (by its marker's time, then by name)."""
    return max(versions, key=lambda v: (v.completed_at or 0.0, v.name), default=None)


def version_at(data_uri: str, listed: Iterable[S3Object], *, datasets_uri: str, marker: str) -> DatasetVersion:
    """The identity of the data at `data_uri` (a folder or a .zip), from a listing of its prefix (or, under
    `datasets_uri`, of its version's folder). Raises IncompleteVersionError for a version without its marker and
    DatasetError when nothing is there."""
    bucket, key = split_s3_uri(data_uri)
    listed = list(listed)
    name = version_name(data_uri, datasets_uri)
    completed_at = None
    if name is not None and unsafe_segment(name) is not None:
        raise DatasetError(
            f"dataset version {name!r} ({data_uri}) is not a folder name the job accepts ({SEGMENT_RULE}): "
            "rename the version's folder"
        )
    if name is not None:
        _, prefix = split_s3_uri(datasets_uri)
        marker_key = f"{prefix}{name}/{marker}"
        done = next((o for o in listed if o.key == marker_key), None)
        if done is None:
            raise IncompleteVersionError(
                f"dataset version {name!r} ({datasets_uri}{name}/) is incomplete: its marker "
                f"s3://{bucket}/{marker_key} is missing. Wait until its upload has finished (the uploader writes "
                f"{marker!r} last), or write the marker if the upload is whole; then trigger again"
            )
        completed_at = done.modified
    if key.endswith(".zip"):
        inside = [S3Object(key.rsplit("/", 1)[-1], o.etag, o.size, o.modified) for o in listed if o.key == key]
    else:
        base = key if key.endswith("/") or not key else key + "/"
        inside = [
            S3Object(o.key[len(base) :], o.etag, o.size, o.modified)
            for o in listed
            if o.key.startswith(base) and not o.key.endswith("/") and o.key != f"{base}{marker}"
        ]
        # One such key fails the job's whole download (remote/sources.py): refuse it before an instance is paid for.
        bad = next((o.key for o in inside if unsafe_segment(o.key) is not None), None)
        if bad is not None:
            raise DatasetError(
                f"s3://{bucket}/{base}{bad} has the unsafe path segment {unsafe_segment(bad)!r} ({SEGMENT_RULE}), "
                "which the training job refuses; rename that object or remove it from the data"
            )
    if not inside:
        raise DatasetError(
            f"no objects at {data_uri}: check training.data_uri (s3://bucket/prefix/ of a folder in the dataset "
            "layout, or the .zip's own key)"
        )
    return DatasetVersion(data_uri, name or "", tuple(sorted(inside, key=lambda o: o.key)), completed_at)


def _version(folder_uri: str, name: str, inside: list[S3Object], marker: str, completed_at: float) -> DatasetVersion:
    data = sorted((o for o in inside if o.key != marker and not o.key.endswith("/")), key=lambda o: o.key)
    # One zip alone in the folder: the job reads the zip itself (remote/sources.py extracts a single .zip object).
    if len(data) == 1 and data[0].key.endswith(".zip") and "/" not in data[0].key:
        return DatasetVersion(f"{folder_uri}{data[0].key}", name, tuple(data), completed_at)
    return DatasetVersion(folder_uri, name, tuple(data), completed_at)
