"""Import shim: CiGateTrigger moved to orchestrator.ci.gate.

A task deferred before the upgrade has its trigger stored under this old classpath in the metadata DB; the triggerer
imports it from here and it resumes. Remove this module in the release after the one that moved it.
"""

from __future__ import annotations

from orchestrator.ci.gate import CiGateTrigger

__all__ = ["CiGateTrigger"]
