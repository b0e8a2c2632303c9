"""Observability of a training run: its report (report.py), its cost (cost.py, pricing.py) and where the report
goes (publish.py: MLflow, and the optional notification and metrics publishers)."""
