"""Load benchmark: N training DAG runs at once on the embedded default, under a real scheduler.

    python -m benchmarks.load_benchmark --runs 8 --max-instances 3          # what tests/load runs in CI
    python -m benchmarks.load_benchmark --runs 16 --max-instances 4 --parallelism 16

Starts the embedded services and a local Airflow (api-server, scheduler with the LocalExecutor, dag-processor,
triggerer), triggers the runs together, and prints the batch's wall time, peak memory, the most instances live at
once against the cap, the runs' final states, the worker-slot seconds `train` held against its duration, and anything
two runs shared. Exit code 1 if a run failed, an
instance was left running, the cap was exceeded or two runs shared anything.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from embedded.deploy.airflow_local import LocalAirflow
from embedded.deploy.load import run_batch
from embedded.deploy.stack import EmbeddedStack, TrainingKnobs

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-instances", type=int, default=3, help="aws.max_instances")
    parser.add_argument("--parallelism", type=int, default=8, help="Airflow's core.parallelism (task processes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for the whole batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the moto server logs every request
    sys.path.insert(0, str(REPO / "dags"))  # the orchestrator package, as Airflow's DAGs folder provides it

    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    knobs = TrainingKnobs.tiny(epochs=args.epochs)
    with (
        tempfile.TemporaryDirectory(prefix="load-") as tmp,
        EmbeddedStack(Path(tmp) / "stack", REPO, knobs=knobs) as stack,
    ):
        env = {**stack.environment(), **load_settings(args.max_instances)}
        with LocalAirflow(Path(tmp) / "airflow", env, parallelism=args.parallelism) as airflow:
            report = run_batch(
                stack,
                airflow,
                runs=args.runs,
                cap=args.max_instances,
                project_tag=env["TRAINER__AWS__PROJECT_TAG"],
                conf={"git_ref": sha.strip()},
                timeout_s=args.timeout,
            )
    print(report.render())
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def load_settings(max_instances: int) -> dict[str, str]:
    """The settings a load batch runs under: its own project tag (so only its instances count) and the cap."""
    return {"TRAINER__AWS__PROJECT_TAG": "load-test", "TRAINER__AWS__MAX_INSTANCES": str(max_instances)}


if __name__ == "__main__":
    sys.exit(main())
