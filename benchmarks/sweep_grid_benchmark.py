"""How long a sweep grid far over the set limit takes to be refused (docs/benchmarks.md).

    python -m benchmarks.sweep_grid_benchmark --values 1000000

A grid of `--values` learning rates times two epochs: the count (2 x values) is over 16, so `expand_sets` must
refuse it; the time shows whether it counted first or checked every value first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(REPO / "dags"))  # the orchestrator package, as Airflow's DAGs folder provides it
    from orchestrator.errors import ConfigError
    from orchestrator.sweeps.sets import expand_sets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000)
    args = parser.parse_args()
    grid = {"learning_rate": [0.001] * args.values, "epochs": [1, 2]}
    started = time.perf_counter()
    try:
        expand_sets(None, grid)
    except ConfigError as exc:
        print(f"{args.values} values refused in {time.perf_counter() - started:.3f} s: {exc}")
    else:
        sys.exit("the grid was accepted")


if __name__ == "__main__":
    main()
