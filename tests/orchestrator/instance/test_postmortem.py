from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.instance.postmortem import PART_MAX_BYTES, Part, assemble, bounded, bundle_parts, collect
from orchestrator.instance.ssh import SshTarget


def test_a_part_keeps_its_end_and_says_it_was_cut() -> None:
    data = b"".join(f"line {i}\n".encode() for i in range(10_000))
    text = bounded(data[-100:], len(data), 100)
    assert text.startswith(f"[... cut to the last 100 of {len(data)} bytes ...]\n")
    assert text.endswith("line 9999\n")
    assert bounded(b"short\n", 6, 100) == "short\n"


def test_the_bundle_stays_within_its_total_and_is_scrubbed() -> None:
    token = "ghp_" + "a" * 36
    raw = {
        "job-output.log": f"cloning https://user:hunter2pass@github.com/o/r.git\ntoken={token}\nAKIAABCDEFGHIJKLMNOP\n",
        "bootstrap.log": "x" * 600,
        "kernel.log": "Out of memory: Killed process 42 (python)\n",
    }
    bundle = assemble(raw, redact=lambda text: text.replace("s3cr3t-value", "***"), total_max_bytes=500)
    job = bundle["job-output.log"]
    assert "hunter2pass" not in job and token not in job and "AKIAABCDEFGHIJKLMNOP" not in job
    assert "https://***@github.com" in job
    # The second part would pass the total: it is left out, saying why; a later small one still fits.
    assert bundle["bootstrap.log"].startswith("[left out: the bundle's 500 bytes")
    assert "Out of memory" in bundle["kernel.log"]
    assert sum(len(text.encode()) for text in bundle.values()) <= 500
    assert assemble({"a": "s3cr3t-value"}, redact=lambda t: t.replace("s3cr3t-value", "***")) == {"a": "***"}


def test_the_parts_name_the_job_log_only_when_a_job_ran() -> None:
    names = [p.name for p in bundle_parts("/var/lib/ec2-trainer")]
    assert names == [
        "bootstrap.log",
        "bootstrap.phases",
        "guard.log",
        "cloud-init-output.log",
        "kernel.log",
        "nvidia-smi.txt",
    ]
    with_job = bundle_parts("/var/lib/ec2-trainer", "/var/lib/ec2-trainer/jobs/k/output.log")
    assert with_job[0] == Part("job-output.log", path="/var/lib/ec2-trainer/jobs/k/output.log")


def test_collect_reads_tails_and_commands_over_ssh(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    log = remote_state_dir / "output.log"
    log.write_text("".join(f"epoch {i} password=hunter2pass\n" for i in range(20_000)))
    parts = (
        Part("job-output.log", path=str(log)),
        Part("missing.log", path=str(remote_state_dir / "nope.log")),
        Part("echo.txt", command="echo from-the-instance"),
    )
    bundle = collect(ssh_target, parts)
    assert bundle["job-output.log"].startswith("[... cut to the last ")
    assert bundle["job-output.log"].rstrip().endswith("epoch 19999 password=***")
    assert len(bundle["job-output.log"].encode()) <= PART_MAX_BYTES + 100
    assert "hunter2pass" not in bundle["job-output.log"]
    assert bundle["missing.log"] == f"[{remote_state_dir / 'nope.log'} does not exist on the instance]\n"
    assert bundle["echo.txt"] == "from-the-instance\n"


def test_an_unreachable_instance_gives_an_empty_bundle(ssh_target: SshTarget, caplog: pytest.LogCaptureFixture) -> None:
    gone = SshTarget("127.0.0.1", 1, ssh_target.user, ssh_target.host_public_key, ssh_target.private_key_pem)
    assert collect(gone, (Part("a", command="true"),)) == {}
    assert "Post-mortem bundle not collected: no SSH" in caplog.text
