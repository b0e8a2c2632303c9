"""Import shim: BootstrapTrigger and RemoteJobTrigger moved to orchestrator.instance.triggers.

A task deferred before the upgrade has its trigger stored under this old classpath in the metadata DB; the triggerer
imports it from here and it resumes. Remove this module in the release after the one that moved them.
"""

from __future__ import annotations

from orchestrator.instance.triggers import BootstrapTrigger, RemoteJobTrigger

__all__ = ["BootstrapTrigger", "RemoteJobTrigger"]
