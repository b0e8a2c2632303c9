"""The stand-in servers of the embedded default: AWS behind its IAM gate, OpenSSH, MLflow, GitHub, SMTP, Slack,
Prometheus, and the data team's uploader; one stand-in per module."""
