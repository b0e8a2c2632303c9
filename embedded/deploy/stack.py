"""Every outside service of the pipeline, started locally: the embedded default.

| production                  | here                                                                    |
| --------------------------- | ----------------------------------------------------------------------- |
| AWS (EC2, SSM, IAM)         | a moto server, plus an emulator that boots instances as loopback sshd   |
| GitHub repo + Actions API   | a stand-in for the API serving this repository as a private one        |
| MLflow tracking server      | a real MLflow server on SQLite with proxied artifacts (or a second one  |
|                             | on PostgreSQL with artifacts in the moto server's S3: `s3_mlflow()`)     |
| Pushgateway + Prometheus    | Debian's prometheus-pushgateway, and prometheus scraping it             |
| mail server, Slack          | an SMTP server (aiosmtpd) keeping mail in a Maildir, and a stand-in for |
|                             | a Slack incoming webhook keeping each message as a JSON file            |

`environment()` returns what Airflow needs to use them (connections as AIRFLOW_CONN_* variables, configuration as
TRAINER__* variables): the DAG and the orchestrator run unchanged; only connections and configuration differ.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from embedded.cloud import DATASET_BUCKET, DATASET_PREFIX, UBUNTU_DLAMI, LocalCloud
from embedded.process import Managed, free_port
from embedded.services.github_standin import GitHubStandIn
from embedded.services.mlflow_server import MlflowServer
from embedded.services.prometheus import Prometheus, Pushgateway
from embedded.services.slack_webhook import SlackWebhookStandIn
from embedded.services.smtp_server import LocalSmtpServer

log = logging.getLogger(__name__)

GITHUB_REPO = "local/ec2-trainer"
AMI_PARAMETER = UBUNTU_DLAMI.parameter
# The embedded default's aws.deployment (a required setting). The emulator boots every instance with the project tag
# key, whichever deployment's: like a hypervisor, it does not care who launched it.
DEPLOYMENT = "embedded"
# config/defaults.toml's aws.instance_types, which the embedded deployment allows and no other.
EMBEDDED_INSTANCE_TYPES = ("g6.xlarge", "g5.xlarge", "g4dn.xlarge")
# Where dataset versions land (embedded.services.datasets uploads them); ec2_retrain trains the latest complete one.
DATASETS_URI = f"s3://{DATASET_BUCKET}/{DATASET_PREFIX}"
# Small enough to train on a laptop's CPU in well under a minute, with a learnable signal.
DEMO_DATA_URI = "synthetic://?train_per_class=120&val_per_class=30&test_per_class=30&size=64&seed=0"
# The embedded default's notification connections (notify.*_conn_id) and recipient.
SMTP_CONN_ID = "smtp_default"
SLACK_CONN_ID = "slack_webhook"
EMAIL_TO = "ml-team@localhost"
# Smaller still, for the tests and the load benchmark: exercises the whole job, learns little.
TINY_DATA_URI = "synthetic://?train_per_class=40&val_per_class=10&test_per_class=10&size=64&seed=0"


@dataclass(frozen=True)
class TrainingKnobs:
    """The training settings of a stack; `tiny()` is the tests' and the load benchmark's."""

    epochs: int = 3
    batch_size: int = 32
    data_uri: str = DEMO_DATA_URI
    image_size: int = 64
    threshold: float = 0.6

    @classmethod
    def tiny(cls, epochs: int = 1) -> TrainingKnobs:
        """Threshold 0: every run that trains is promoted, so the evaluate step always runs to its end."""
        return cls(epochs=epochs, batch_size=16, data_uri=TINY_DATA_URI, image_size=64, threshold=0.0)


def _client_key() -> tuple[str, str]:
    """A fresh Ed25519 key pair for Airflow's SSH connection (generated, never committed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


class EmbeddedStack(Managed):
    """`mlflow_port`, `github_port` and `prometheus_port` fix the services a browser opens (links and the URLs
    printed must outlive a restart); None picks free ports, as the tests do. One stack per process: moto keeps one
    state per process (LocalCloud)."""

    def __init__(
        self,
        workdir: Path,
        repo_dir: Path,
        *,
        knobs: TrainingKnobs | None = None,
        mlflow_port: int | None = None,
        github_port: int | None = None,
        prometheus_port: int | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.repo_dir = repo_dir.resolve()
        self.knobs = knobs or TrainingKnobs()
        # The instances' login user must reach their disk and the data cache: a temp folder others may traverse
        # (workdir may lie under a private folder, as pytest's do).
        self.instance_area = Path(tempfile.mkdtemp(prefix="ec2-trainer-instances-"))
        self.instance_area.chmod(0o755)
        self.disk_root = self.instance_area / "disk"
        self.data_cache = self.instance_area / "data-cache"
        self.state_dir = self.disk_root / "var" / "lib" / "ec2-trainer"
        # Not 22: instances listen on the port their user-data's sshd drop-in sets, as a real one would.
        self.ssh_port = free_port()
        self.github_token = secrets.token_hex(20)
        self.ssh_private_key, self.ssh_public_key = _client_key()
        self.cloud = LocalCloud(
            self.workdir / "cloud",
            disk_root=self.disk_root,
            ssh_port=self.ssh_port,
            deployment=DEPLOYMENT,
            # The stand-in for the AMI's interpreter (INSTANCE__PYTHON_BIN): the login user runs the job with it.
            image_paths=(Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix)),
        )
        self.mlflow = MlflowServer(self.workdir / "mlflow", port=mlflow_port)
        self.github = GitHubStandIn(self.repo_dir, repo=GITHUB_REPO, token=self.github_token, port=github_port or 0)
        self.github_url = ""
        self.pushgateway = Pushgateway(self.workdir / "pushgateway")
        self.prometheus = Prometheus(self.workdir / "prometheus", [self.pushgateway.address], port=prometheus_port)
        notifications = self.workdir / "notifications"
        self.smtp = LocalSmtpServer(notifications)
        self.slack = SlackWebhookStandIn(notifications / "slack")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk_root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.data_cache.mkdir(mode=0o755, exist_ok=True)
        self.cloud.start()
        if self.cloud.login_user != pwd.getpwuid(os.geteuid()).pw_name:
            # The training job runs as the login user: the cache is its, as ~/.cache would be.
            user = pwd.getpwnam(self.cloud.login_user)
            os.chown(self.data_cache, user.pw_uid, user.pw_gid)
        self.github_url = self.github.start()
        self.mlflow.start()
        self.pushgateway.start()
        self.prometheus.start()
        self.smtp.start()
        self.slack.start()

    def stop(self) -> None:
        for stop in (
            self.cloud.stop,
            self.github.stop,
            self.mlflow.stop,
            self.prometheus.stop,
            self.pushgateway.stop,
            self.smtp.stop,
            self.slack.stop,
        ):
            try:
                stop()
            except Exception:  # stop the rest whatever one of them does
                log.exception("stopping %s failed", stop)
        shutil.rmtree(self.instance_area, ignore_errors=True)

    def s3_mlflow(self, workdir: Path, backend_store_uri: str, bucket: str) -> MlflowServer:
        """A production-like MLflow server (not started): `backend_store_uri` (e.g. PostgreSQL), artifacts in a new
        bucket of this stack's moto server, reached as a real S3 through MLFLOW_S3_ENDPOINT_URL."""
        self.cloud.client("s3").create_bucket(Bucket=bucket)
        return MlflowServer(
            workdir,
            backend_store_uri=backend_store_uri,
            artifacts_destination=f"s3://{bucket}/artifacts",
            env={
                "MLFLOW_S3_ENDPOINT_URL": self.cloud.endpoint_url,
                # The tracking server's own store, outside the documented policies: the stand-in's admin.
                "AWS_ACCESS_KEY_ID": self.cloud.admin.access_key,
                "AWS_SECRET_ACCESS_KEY": self.cloud.admin.secret_key,
                "AWS_DEFAULT_REGION": self.cloud.region,
            },
        )

    def job_dirs(self) -> list[Path]:
        """The training job directories on every instance booted so far, as this machine sees them."""
        jobs = (self.cloud.host_path(i, self.state_dir / "jobs") for i in list(self.cloud.instances.values()))
        return [job for root in dict.fromkeys(jobs) for job in sorted(root.glob("*"))]

    def environment(self) -> dict[str, str]:
        """AIRFLOW_CONN_* and TRAINER__* variables that point the unchanged pipeline at these services."""
        k = self.knobs
        network = self.cloud.network
        if network is None:
            raise RuntimeError("the stack is not started: start() creates its network")
        conns = {
            "AIRFLOW_CONN_AWS_DEFAULT": {
                "conn_type": "aws",
                # Airflow's own identity: every request it makes is checked against config/iam/airflow.json.
                "login": self.cloud.airflow.access_key,
                "password": self.cloud.airflow.secret_key,
                "extra": {"endpoint_url": self.cloud.endpoint_url, "region_name": self.cloud.region},
            },
            "AIRFLOW_CONN_GITHUB_DEFAULT": {"conn_type": "http", "password": self.github_token},
            "AIRFLOW_CONN_EC2_TRAINER_SSH": {
                "conn_type": "ssh",
                "login": self.cloud.login_user,
                "extra": {"private_key": self.ssh_private_key},
            },
            # A local relay, as a mail server on localhost would be: plain SMTP, no login (the tests also run the
            # server with STARTTLS and AUTH, as a submission server on 587 asks).
            f"AIRFLOW_CONN_{SMTP_CONN_ID.upper()}": {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": self.smtp.port,
                "extra": {
                    "disable_ssl": True,
                    "disable_tls": True,
                    "from_email": "ec2-trainer@localhost",
                    "timeout": 10,
                    "retry_limit": 1,
                },
            },
            # As Slack hands it out: the whole webhook URL is the secret, kept as the password.
            f"AIRFLOW_CONN_{SLACK_CONN_ID.upper()}": {"conn_type": "slackwebhook", "password": self.slack.url},
        }
        settings = {
            "GITHUB__REPO": GITHUB_REPO,
            "GITHUB__API_URL": self.github_url,
            "GITHUB__CI_POLL_SECONDS": "1",
            "AWS__REGION": self.cloud.region,
            "AWS__AMI_SSM_PARAMETER": AMI_PARAMETER,
            "AWS__INSTANCE_PROFILE": self.cloud.instance_profile,
            "AWS__DEPLOYMENT": DEPLOYMENT,
            "AWS__SUBNET_IDS": ",".join(network.subnet_ids),
            "AWS__SECURITY_GROUP_IDS": network.security_group_id,
            "AWS__MAX_LIFETIME_MINUTES": "60",
            "AWS__LAUNCH_TIMEOUT_MINUTES": "2",
            # The types the defaults try: the trigger form offers these and refuses others before anything runs.
            "AWS__ALLOWED_INSTANCE_TYPES": ",".join(EMBEDDED_INSTANCE_TYPES),
            # The emulated AMI's default user (unprivileged; root only where the stack is not run as root).
            "INSTANCE__SSH_USER": self.cloud.login_user,
            "INSTANCE__SSH_PORT": str(self.ssh_port),
            "INSTANCE__STATE_DIR": str(self.state_dir),
            # The stand-in instance's "AMI" interpreter: this environment, which already has torch and mlflow.
            "INSTANCE__PYTHON_BIN": sys.executable,
            "INSTANCE__REQUIRE_GPU": "false",
            "INSTANCE__READY_TIMEOUT_MINUTES": "3",
            "INSTANCE__POLL_SECONDS": "0.5",
            "MLFLOW__TRACKING_URI": self.mlflow.url,
            "MLFLOW__EXPERIMENT": "hurricane-damage-embedded",
            "MLFLOW__THRESHOLD": str(k.threshold),
            "TRAINING__EPOCHS": str(k.epochs),
            "TRAINING__BATCH_SIZE": str(k.batch_size),
            "TRAINING__DATA_URI": k.data_uri,
            "TRAINING__TIMEOUT_MINUTES": "20",
            "TRAINING__EXTRA_PARAMS": f"image_size={k.image_size},workers=2,cache_dir={self.data_cache}",
            "METRICS__PUSHGATEWAY_URL": self.pushgateway.url,
            # The retraining DAGs watch the stack's dataset bucket through its queue (off in defaults.toml).
            "DATASETS__URI": DATASETS_URI,
            "DATASETS__SQS_QUEUE_URL": self.cloud.dataset_queue_url,
            "NOTIFY__SMTP_CONN_ID": SMTP_CONN_ID,
            "NOTIFY__SLACK_WEBHOOK_CONN_ID": SLACK_CONN_ID,
            "NOTIFY__EMAIL_TO": EMAIL_TO,
        }
        env = {name: json.dumps(value) for name, value in conns.items()}
        env.update({f"TRAINER__{name}": value for name, value in settings.items()})
        return env
