"""The training DAG's step results as XCom holds them today (orchestrator.contracts_steps), written out by hand: a
test that reads one of these reads what a task queued or deferred before an upgrade would find."""

from __future__ import annotations

from typing import Any

PLAN: dict[str, Any] = {
    "ami_id": "ami-0123456789abcdef0",
    "ami_name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20261120",
    "root_device_name": "/dev/sda1",
    "root_volume_gb": 100,
    "git_sha": "0123456789abcdef0123456789abcdef01234567",
    "dag_id": "ec2_training",
    "run_id": "manual__2026-11-26T10:00:00+00:00",
    "bake": False,
}
LAUNCHED: dict[str, Any] = {
    "instance_id": "i-0abc",
    "instance_type": "g6.xlarge",
    "market": "spot",
    "reused": False,
    "host_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey",
}
RUNNING: dict[str, Any] = {
    "instance_id": "i-0abc",
    "instance_type": "g6.xlarge",
    "market": "spot",
    "address": "10.0.0.1",
    "started_at": 1764151200.25,
    "deadline": 1764153000.0,
    "seconds_to_running": 2.0,
}
READY: dict[str, Any] = {
    "instance_id": "i-0abc",
    "instance_type": "g6.xlarge",
    "market": "spot",
    "address": "10.0.0.1",
    "port": 22,
    "host_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey",
    "seconds_to_running": 2.0,
    "seconds_to_ssh": 32.5,
    "seconds_to_ready": 95.0,
    "bootstrap_phases_s": {"user": 0.0, "gpu": 1.0, "packages": 20.0, "python": 40.0},
}
EVALUATION: dict[str, Any] = {
    "run_id": "f" * 32,
    "metric": "test_accuracy",
    "value": 0.92,
    "champion_value": None,
    "promoted": True,
    "reason": "0.9200 passes the threshold 0.8000; there is no champion yet",
    "model_version": "1",
}
