from __future__ import annotations

from pathlib import Path

from benchmarks.suite_durations import module_durations

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.faults.test_ec2_faults" name="test_a" time="10.5"/>
  <testcase classname="tests.faults.test_ec2_faults" name="test_b" time="2.0"/>
  <testcase classname="tests.orchestrator.instance.test_ssh.TestPinned" name="test_c" time="0.25"/>
</testsuite></testsuites>
"""


def test_times_are_summed_per_module_with_classes_counted_in_their_module(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(REPORT)
    assert module_durations(report) == {
        "tests/faults/test_ec2_faults.py": (12.5, 2),
        "tests/orchestrator/instance/test_ssh.py": (0.25, 1),
    }
