"""Where the test suite's time goes: per-module totals from a pytest JUnit XML report.

    make test PYTEST_ARGS=--junitxml=/tmp/junit.xml   # or any pytest run with --junitxml
    python -m benchmarks.suite_durations /tmp/junit.xml [--top 25]

Prints each test module's summed test time (setup, call and teardown, as JUnit records them), its test count and its
share, slowest first. With pytest-xdist the sum over modules is about the workers' count times the wall time.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def module_durations(report: Path) -> dict[str, tuple[float, int]]:
    """Module path -> (summed seconds, test count), from the testcases' `classname` (dotted module[.Class])."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - a report this machine's pytest wrote
        parts = case.get("classname", "").split(".")
        # A class inside a module (tests.x.test_y.TestZ) counts toward its module.
        module_parts = parts[:-1] if parts and parts[-1][:1].isupper() else parts
        entry = totals["/".join(module_parts) + ".py"]
        entry[0] += float(case.get("time", 0.0))
        entry[1] += 1
    return {module: (seconds, int(count)) for module, (seconds, count) in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a pytest --junitxml report")
    parser.add_argument("--top", type=int, default=25, help="how many modules to list (default 25)")
    args = parser.parse_args(argv)
    durations = module_durations(args.report)
    total = sum(seconds for seconds, _ in durations.values()) or 1.0
    print(f"{'module':<58} {'tests':>5} {'seconds':>8} {'share':>6}")
    ranked = sorted(durations.items(), key=lambda item: -item[1][0])
    for module, (seconds, count) in ranked[: args.top]:
        print(f"{module:<58} {count:>5} {seconds:>8.1f} {seconds / total:>6.1%}")
    print(f"{'all ' + str(len(durations)) + ' modules':<58} {sum(c for _, c in durations.values()):>5} {total:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
