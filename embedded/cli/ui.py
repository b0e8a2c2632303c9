"""`make ui`: the embedded default's local deployment, up until Ctrl-C, for a browser.

The same deployment as `make demo` (embedded.deploy.deployment), on the same state folder and ports: the Airflow UI
shows the demo's runs with their task logs, the MLflow UI its runs, the GitHub stand-in the commits' checks pages; a
run triggered from Airflow's form trains against the embedded default. The URLs and the login are the last lines
printed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from embedded.deploy.deployment import ADMIN_USER, REPO, LocalDeployment, Ports, log_to_file


def banner(urls: dict[str, str], login: tuple[str, str], state_root: Path) -> str:
    return "\n".join(
        [
            f"The embedded default is up (data and logs in {state_root}); Ctrl-C stops it.",
            *(f"  {name:<16} {url}" for name, url in urls.items()),
            f"  login            {login[0]} / {login[1]}",
        ]
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
            print(banner(deployment.urls(), (ADMIN_USER, deployment.password), state_root), flush=True)
            # A component that dies is started again by the deployment's supervisor; only one it gave up ends this.
            while not deployment.airflow.given_up:
                time.sleep(2)
            print(f"{'; '.join(deployment.airflow.given_up.values())}; stopping.", flush=True)
            return 1
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "dags"))
    sys.exit(main())
