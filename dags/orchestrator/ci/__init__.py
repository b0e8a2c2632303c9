"""The CI gate: the GitHub client (github.py) and what GitHub's answers mean (github_protocol.py), the verdict over
workflow runs (verdict.py) and the gate's operator, trigger and link (gate.py)."""
