"""A data team's uploader, for the embedded default: dataset versions in the job's layout, put into the stack's
dataset bucket object by object, the completion marker last (or never, for a half-finished upload)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from remote import synthetic

MARKER = "_SUCCESS"


def upload_version(
    s3: Any,
    datasets_uri: str,
    version: str,
    *,
    data_uri: str,
    complete: bool = True,
    as_zip: bool = False,
) -> list[str]:
    """Generate `data_uri`'s synthetic dataset and upload it as `<datasets_uri><version>/` (its files, or one
    data.zip), then the marker when `complete`; the keys written, in order."""
    parts = urlsplit(datasets_uri)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    folder = f"{prefix}{version}/"
    written = []
    with tempfile.TemporaryDirectory(prefix="dataset-version-") as tmp:
        root = Path(tmp) / "data"
        synthetic.generate(synthetic.parse_synthetic_uri(data_uri), root)
        if as_zip:
            archive = shutil.make_archive(str(Path(tmp) / "data"), "zip", root)
            files = [(Path(archive), "data.zip")]
        else:
            files = [(path, path.relative_to(root).as_posix()) for path in sorted(root.rglob("*")) if path.is_file()]
        for path, name in files:
            s3.upload_file(str(path), bucket, folder + name)
            written.append(folder + name)
    if complete:
        s3.put_object(Bucket=bucket, Key=folder + MARKER, Body=b"")
        written.append(folder + MARKER)
    return written
