"""Benchmarks of the training job (run as modules: python -m benchmarks.train_benchmark)."""

from __future__ import annotations
