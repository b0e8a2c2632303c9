"""Where checkpoints are kept: a local folder or an S3 prefix, behind one small interface of whole objects.

`checkpoint_uri` names the root; each MLflow run gets its own prefix below it, named by its run id, so a run that
resumes finds its own checkpoints and no other run's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from remote.errors import ParameterError
from remote.pathnames import BUCKET_NAME, SEGMENT_RULE, unsafe_segment


class Store(Protocol):
    """Whole objects by key, relative to one run's prefix. Every method raises on failure (OSError, botocore's)."""

    location: str  # for messages: the run's prefix as a uri, without credentials

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> list[str]:
        """Every key under the run's prefix."""
        ...


def validate_uri(raw: str) -> str:
    """`checkpoint_uri` as given, checked: "" (off), s3://bucket/prefix, file:///folder or a local folder."""
    uri = raw.strip()
    if not uri:
        return ""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        prefix = parts.path.strip("/")
        if not BUCKET_NAME.fullmatch(parts.netloc):
            raise ParameterError(f"checkpoint_uri {uri!r} names no valid bucket; use s3://bucket/prefix/")
        if prefix and unsafe_segment(prefix) is not None:
            raise ParameterError(f"checkpoint_uri {uri!r} has an unsafe key segment ({SEGMENT_RULE})")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ParameterError(f"checkpoint_uri {uri!r}: use a plain s3://bucket/prefix/")
        return uri
    if parts.scheme not in ("", "file") and len(parts.scheme) > 1:  # one letter is a Windows drive
        raise ParameterError(f"checkpoint_uri scheme {parts.scheme!r} is not supported; use s3://, file:// or a folder")
    return uri


class LocalStore:
    """A folder: for local runs and tests. Writes are atomic (a temporary file renamed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".part-", delete=False) as partial:
            partial.write(data)
        os.replace(partial.name, path)

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def delete(self, key: str) -> None:
        path = self.root / key
        path.unlink(missing_ok=True)
        if path.parent != self.root and not any(path.parent.iterdir()):
            path.parent.rmdir()

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and not path.name.startswith(".part-")
        ]


class S3Store:
    """An S3 prefix, with the instance profile's credentials (the default chain) and botocore's standard retries."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        if client is None:
            import boto3  # only S3 checkpoints need it
            from botocore.config import Config

            client = boto3.client("s3", config=Config(retries={"mode": "standard"}))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        return bytes(body.read())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self) -> list[str]:
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            found.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        return found


def open_store(uri: str, run_id: str, s3_client: Any = None) -> Store:
    """The store of one MLflow run's checkpoints under `uri` (validated by `validate_uri`)."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        root = parts.path.strip("/")
        return S3Store(parts.netloc, f"{root}/{run_id}/" if root else f"{run_id}/", s3_client)
    folder = parts.path if parts.scheme == "file" else uri
    return LocalStore(Path(folder).expanduser() / run_id)
