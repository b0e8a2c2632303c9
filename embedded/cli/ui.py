"""`make ui`: the embedded default's local deployment, up until Ctrl-C, for a browser.

The same deployment as `make demo` (embedded.deploy.deployment), on the same state folder and ports: the Airflow UI
shows the demo's runs with their task logs, the MLflow UI its runs, the GitHub stand-in the commits' checks pages; a
run triggered from Airflow's form trains against the embedded default. The URLs, the login, the S3 endpoint of the
dataset bucket and the command that uploads a dataset version (`make upload-dataset`, which finds this deployment
through embedded.cli.running's state file) are the last lines printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from embedded.cli import running
from embedded.cli.running import RunningUi
from embedded.deploy.deployment import ADMIN_USER, REPO, LocalDeployment, Ports, log_to_file
from embedded.deploy.stack import DATASETS_URI


def banner(urls: dict[str, str], ui: RunningUi, state_root: Path) -> str:
    return "\n".join(
        [
            f"The embedded default is up (data and logs in {state_root}); Ctrl-C stops it.",
            *(f"  {name:<16} {url}" for name, url in urls.items()),
            f"  login            {ui.airflow_login[0]} / {ui.airflow_login[1]}",
            f"  S3 (datasets)    {ui.s3_endpoint}  {ui.datasets_uri}",
            "  new data         make upload-dataset  (a dataset version to S3; ec2_retrain, once unpaused, trains it)",
        ]
    )


def running_ui(deployment: LocalDeployment) -> RunningUi:
    """What `make upload-dataset` needs of this deployment (embedded.cli.running)."""
    cloud = deployment.stack.cloud
    return RunningUi(
        pid=os.getpid(),
        airflow_url=deployment.airflow.url,
        airflow_login=(ADMIN_USER, deployment.password),
        branch=deployment.branch,
        s3_endpoint=cloud.endpoint_url,
        region=cloud.region,
        access_key=cloud.admin.access_key,
        secret_key=cloud.admin.secret_key,
        datasets_uri=DATASETS_URI,
        dataset_queue_url=cloud.dataset_queue_url,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state", help="where the deployment keeps its data")
    Ports.add_arguments(parser)
    args = parser.parse_args(argv)

    state_root: Path = args.state_dir.resolve()
    log_to_file(state_root / "ui.log")
    # SIGTERM (a supervisor, `kill`) stops it as cleanly as Ctrl-C: both leave the with-block below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ports = Ports.from_arguments(args)
    print(f"Starting the embedded services and Airflow (state in {state_root}) ...", flush=True)
    try:
        with LocalDeployment(state_root, ports=ports) as deployment:
            ui = running_ui(deployment)
            running.write(state_root, ui)
            try:
                print(banner(deployment.urls(), ui, state_root), flush=True)
                # A component that dies is started again by the deployment's supervisor; only one it gave up ends
                # this.
                while not deployment.airflow.given_up:
                    time.sleep(2)
                print(f"{'; '.join(deployment.airflow.given_up.values())}; stopping.", flush=True)
                return 1
            finally:
                # Before the services stop: a command started now fails saying none runs, not on a dead endpoint.
                running.remove(state_root)
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "dags"))
    sys.exit(main())
