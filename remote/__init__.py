"""The hurricane-damage training job run by `mlflow run` on the instance (entry point: `python -m remote.train`)."""

from __future__ import annotations
