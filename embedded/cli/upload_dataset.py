"""`make upload-dataset`: upload a dataset version to the running `make ui`'s S3, as a data team's uploader would,
and say what happens next.

It finds the deployment through the state file `make ui` writes while it runs (embedded.cli.running: S3 endpoint,
keys, dataset bucket, Airflow), generates a synthetic dataset in the job's layout and uploads it as the next version
(`v1`, `v2`, ...) under the deployment's `datasets.uri`, its completion marker last (embedded.services.datasets).
The bucket notifies the deployment's SQS queue; the triggerer's watcher updates the dataset asset, which schedules
`ec2_retrain` (when unpaused), which trains that version on the branch's latest commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from embedded.cli import running
from embedded.cli.running import NotRunning, RunningUi
from embedded.deploy.stack import DEMO_DATA_URI
from embedded.services.datasets import MARKER, upload_version
from remote.errors import ParameterError

RETRAIN_DAG_ID = "ec2_retrain"
# A version name the job accepts (remote/pathnames.py's rule, kept simple: one plain folder name).
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UploadError(RuntimeError):
    """The upload cannot go ahead as asked; the message says what to change."""


def s3_client(ui: RunningUi) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=ui.s3_endpoint,
        region_name=ui.region,
        aws_access_key_id=ui.access_key,
        aws_secret_access_key=ui.secret_key,
        # A stopped `make ui` refuses connections: say so after one retry, not after boto3's default five.
        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5),
    )


def existing_versions(s3: Any, datasets_uri: str) -> list[str]:
    """The version folders under `datasets_uri`, complete or not."""
    bucket, _, prefix = datasets_uri.removeprefix("s3://").partition("/")
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        names += [entry["Prefix"][len(prefix) :].rstrip("/") for entry in page.get("CommonPrefixes", [])]
    return names


def next_version(existing: list[str]) -> str:
    """v<N+1> after the highest v<N> already there; v1 for the first."""
    numbers = [int(match.group(1)) for name in existing if (match := re.fullmatch(r"v(\d+)", name))]
    return f"v{max(numbers, default=0) + 1}"


def default_data_uri(existing: list[str]) -> str:
    """The demo's synthetic data with a seed of this upload's own (one more than the versions already there): new
    bytes, so a new digest, so a training of its own (ec2_retrain skips a commit already trained on the same data)."""
    return DEMO_DATA_URI.replace("seed=0", f"seed={len(existing) + 1}")


def retrain_paused(ui: RunningUi) -> bool | None:
    """Whether Airflow has ec2_retrain paused; None when it did not say (the reason is not the upload's concern)."""

    def call(method: str, path: str, body: Any = None, token: str = "") -> Any:
        request = urllib.request.Request(  # noqa: S310 - the local deployment's own URL
            f"{ui.airflow_url}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    try:
        user, password = ui.airflow_login
        token = call("POST", "/auth/token", {"username": user, "password": password})["access_token"]
        return bool(call("GET", f"/api/v2/dags/{RETRAIN_DAG_ID}", token=token)["is_paused"])
    except (OSError, urllib.error.URLError, KeyError, ValueError):
        return None


def what_happens_next(ui: RunningUi, version_uri: str, paused: bool | None) -> str:
    queue = ui.dataset_queue_url.rsplit("/", 1)[-1]
    retrain_page = f"{ui.airflow_url}/dags/{RETRAIN_DAG_ID}"
    steps = [
        "What happens next:",
        f"  1. The bucket notifies its SQS queue ({queue}); the triggerer's watcher reads the marker's event and "
        f"updates the dataset asset {ui.datasets_uri} (seconds).",
        f"  2. That schedules {RETRAIN_DAG_ID}: it takes the latest complete version ({version_uri}) and the latest "
        f"commit of {ui.branch}, and triggers ec2_training on them as run retrain__<commit>__<data digest> (skipped, "
        "saying so, when that commit already trained on this data).",
        f"  3. Follow it on {retrain_page}, then the ec2_training run it triggered and that run's MLflow run.",
    ]
    if paused:
        steps.append(
            f"But {RETRAIN_DAG_ID} is paused (DAGs start paused), so step 2 does not happen for this upload: unpause "
            f"it (its toggle on {retrain_page}), then trigger it once by hand: it trains the latest complete "
            "version, this one. Uploads after that start it by themselves."
        )
    elif paused is None:
        steps.append(
            f"Airflow did not say whether {RETRAIN_DAG_ID} is paused: if it is, unpause it on {retrain_page} and "
            "trigger it once by hand (a paused DAG is not scheduled by this upload)."
        )
    return "\n".join(steps)


def upload(ui: RunningUi, version: str | None, data_uri: str | None, out: TextIO) -> str:
    """Upload the version (the next free one by default); the report printed on `out` ends with what happens next.
    The version's folder URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = s3_client(ui)
    try:
        existing = existing_versions(s3, ui.datasets_uri)
    except (BotoCoreError, ClientError) as exc:
        raise UploadError(
            f"`make ui`'s S3 at {ui.s3_endpoint} did not answer ({exc}): is it stopping? Start `make ui` again"
        ) from None
    version = version or next_version(existing)
    if not VERSION_NAME.fullmatch(version):
        raise UploadError(f"version {version!r}: use letters, digits and '._-' (starting with a letter or digit)")
    if version in existing:
        raise UploadError(
            f"version {version} already exists under {ui.datasets_uri}: a version is never changed once uploaded; "
            f"pick another name (the next free one is {next_version(existing)}), or leave it out"
        )
    data_uri = data_uri or default_data_uri(existing)
    version_uri = f"{ui.datasets_uri}{version}/"
    print(f"Generating {data_uri} and uploading it as {version_uri} (S3 at {ui.s3_endpoint}) ...", file=out, flush=True)
    try:
        keys = upload_version(s3, ui.datasets_uri, version, data_uri=data_uri)
    except ParameterError as exc:
        raise UploadError(f"--data-uri: {exc}") from None
    print(
        f"Uploaded version {version}: {len(keys)} objects, the marker {MARKER} last, so the version is complete.",
        file=out,
    )
    print(what_happens_next(ui, version_uri, retrain_paused(ui)), file=out, flush=True)
    return version_uri


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path(".state"), help="the state folder `make ui` runs on")
    parser.add_argument("--version", help="the version's folder name; default: the next free v<N>")
    parser.add_argument(
        "--data-uri",
        help="a synthetic:// dataset to generate (options in MLproject); default: the demo's, seeded per version",
    )
    args = parser.parse_args(argv)
    try:
        upload(running.read(args.state_dir.resolve()), args.version, args.data_uri, out)
    except (NotRunning, UploadError) as exc:
        print(f"upload-dataset: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
