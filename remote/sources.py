"""Resolve a data uri to a local folder in the dataset layout: a folder, a .zip, s3://, or synthetic://.

Remote and generated data are cached on local disk so repeated runs on the same instance fetch nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from remote import synthetic
from remote.errors import DataError
from remote.layout import REQUIRED_SPLITS
from remote.pathnames import BUCKET_NAME, SEGMENT_RULE, unsafe_segment

log = logging.getLogger(__name__)

_READY_MARKER = ".complete"
_S3_DOWNLOAD_THREADS = 32  # thousands of small objects: latency-bound, not bandwidth-bound


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/hurricane-damage`, else `~/.cache/hurricane-damage`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hurricane-damage"


def redact_uri(uri: str) -> str:
    """The uri without any user:password part, safe for logs and tags."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def find_root(folder: Path) -> Path:
    """The folder holding the split folders: `folder` itself or, as zips often nest, one level below."""
    if any((folder / split).is_dir() for split in REQUIRED_SPLITS):
        return folder
    children = [child for child in folder.iterdir() if child.is_dir() and not child.name.startswith((".", "__"))]
    if len(children) == 1 and any((children[0] / split).is_dir() for split in REQUIRED_SPLITS):
        return children[0]
    return folder


def _inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused (DataError naming `what`) unless it is plainly a path under `folder`.

    The segment rule is remote/pathnames.py's, which the pre-launch checks share.
    """
    bad = unsafe_segment(relative)
    if bad is not None:
        raise DataError(
            f"{what} has the unsafe path segment {bad!r} ({SEGMENT_RULE}) and would not stay inside the data "
            "cache; rename it to plain folder/file names or move it out of the data"
        )
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{what} resolves to {path.resolve()}, outside the data cache {folder}; rename it")
    return path


def _extract_zip(archive: Path, cache_dir: Path) -> Path:
    stat = archive.stat()
    digest = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "zip" / digest
    if not (target / _READY_MARKER).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            try:
                with zipfile.ZipFile(archive) as bundle:
                    # extractall would quietly rewrite these names; a hostile archive is refused instead.
                    for name in bundle.namelist():
                        _inside(staging, name.removesuffix("/"), f"zip member {name!r} of {archive}")
                    bundle.extractall(staging)
            except zipfile.BadZipFile as exc:
                raise DataError(f"{archive} is not a readable zip file ({exc}); re-create the archive") from None
            (staging / _READY_MARKER).touch()
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("extracted %s into %s", archive, target)
    return find_root(target)


def _download_s3(uri: str, cache_dir: Path) -> Path:
    """Mirror every object under the prefix into the cache; objects already there with the same size are kept."""
    import boto3  # only the s3 path needs it

    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise DataError(f"s3 uri {uri!r} names no bucket; use s3://bucket/prefix")
    if not BUCKET_NAME.fullmatch(bucket):
        raise DataError(f"s3 uri {uri!r}: {bucket!r} is not a bucket name; use s3://bucket/prefix")
    client = boto3.client("s3")  # credentials: the instance profile (default chain), never from the job's params
    bucket_dir = cache_dir / "s3" / bucket
    target = _inside(bucket_dir, prefix.removesuffix("/"), f"the prefix of {uri}") if prefix else bucket_dir
    keys: list[tuple[str, int]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(
                (item["Key"], item["Size"]) for item in page.get("Contents", []) if not item["Key"].endswith("/")
            )
    except Exception as exc:  # botocore raises many unrelated types; all mean the same to the user here
        raise DataError(f"cannot list {uri}: {exc}; check the bucket name and the instance's S3 permissions") from None
    if not keys:
        raise DataError(f"no objects under {uri}; check the bucket and prefix")
    if len(keys) == 1 and keys[0][0].endswith(".zip"):
        keys_to_paths = {keys[0][0]: _inside(bucket_dir, keys[0][0], f"s3 key {keys[0][0]!r} in bucket {bucket}")}
    else:
        keys_to_paths = _prefix_paths(bucket, prefix, [key for key, _ in keys], target)
    sizes = dict(keys)
    missing = [key for key, path in keys_to_paths.items() if not (path.exists() and path.stat().st_size == sizes[key])]

    def fetch(key: str) -> None:
        path = keys_to_paths[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        client.download_file(bucket, key, str(partial))
        partial.replace(path)

    if missing:
        log.info("downloading %d of %d objects from %s", len(missing), len(keys), uri)
        try:
            with ThreadPoolExecutor(_S3_DOWNLOAD_THREADS) as pool:
                list(pool.map(fetch, missing))
        except Exception as exc:  # as above: any failure means the same fix
            raise DataError(f"cannot download {uri}: {exc}; check the instance's S3 permissions") from None
    log.info("s3 data cached in %s (%d objects, %d downloaded)", target, len(keys), len(missing))
    only = next(iter(keys_to_paths.values()))
    if len(keys_to_paths) == 1 and only.suffix == ".zip":
        return _extract_zip(only, cache_dir)
    return find_root(target)


def _prefix_paths(bucket: str, prefix: str, keys: list[str], target: Path) -> dict[str, Path]:
    """Where each object under the prefix (a folder) lands under `target`; objects beside the folder are left out."""
    base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    paths: dict[str, Path] = {}
    for key in keys:
        if key == prefix:
            raise DataError(
                f"s3 key {key!r} in bucket {bucket} is the prefix itself, so it would take the folder's place; "
                "pass s3://BUCKET/PREFIX/ for a folder of objects, or rename that object"
            )
        if key.startswith(base):  # a prefix 'hurricane' also lists 'hurricane-old/...': not in this folder
            paths[key] = _inside(target, key[len(base) :], f"s3 key {key!r} in bucket {bucket}")
    if not paths:
        raise DataError(f"no objects in the folder s3://{bucket}/{base}; check the prefix")
    return paths


def resolve(data_uri: str, cache_dir: Path) -> Path:
    """A local folder in the dataset layout for `data_uri`; raises DataError (or ParameterError) with the fix."""
    uri = data_uri.strip()
    scheme = urlsplit(uri).scheme
    if scheme == "synthetic":
        return synthetic.materialize(synthetic.parse_synthetic_uri(uri), cache_dir)
    if scheme == "s3":
        return _download_s3(uri, cache_dir)
    if scheme == "file":
        uri = urlsplit(uri).path
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise DataError(
            f"unsupported data uri scheme {scheme!r}; use a folder, a .zip, s3://bucket/prefix or synthetic://"
        )
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass a folder in the dataset layout, a .zip or an s3:// uri")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DataError(f"data file {path} is not a .zip; pass a folder in the dataset layout or a .zip of it")
        return _extract_zip(path, cache_dir)
    return find_root(path)
