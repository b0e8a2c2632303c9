"""Shared pytest fixtures: a real OpenSSH server on loopback with keys generated at test time.

Registered for the whole test tree through `pytest_plugins` in tests/conftest.py. The login user is the user running
the tests; "remote" paths are local paths, since the server is this machine.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embedded.services.sshd import LoopbackSshd
from orchestrator.instance.ssh import SshTarget


@dataclass(frozen=True)
class SshKeyPair:
    public_line: str  # "ssh-ed25519 AAAA..."
    private_pem: str = field(repr=False)


OPENSSH_PRIVATE_LABEL = "OPENSSH PRIVATE KEY"


def pem_armor(body: str, label: str = OPENSSH_PRIVATE_LABEL) -> str:
    """`body` in PEM armour: tests of what is *not* a usable key build it here, so no key-shaped text is committed."""
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def make_ed25519_keypair() -> SshKeyPair:
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public_line = (
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    )
    return SshKeyPair(public_line=public_line, private_pem=private_pem)


@pytest.fixture(scope="session")
def ssh_host_keypair() -> SshKeyPair:
    """The loopback server's host key pair (what launch generates and pins for a real instance)."""
    return make_ed25519_keypair()


@pytest.fixture(scope="session")
def ssh_client_keypair() -> SshKeyPair:
    """The orchestrator's login key pair, authorized on the loopback server."""
    return make_ed25519_keypair()


@pytest.fixture(scope="session")
def loopback_sshd(
    tmp_path_factory: pytest.TempPathFactory, ssh_host_keypair: SshKeyPair, ssh_client_keypair: SshKeyPair
) -> Iterator[LoopbackSshd]:
    """A running sshd on 127.0.0.1 (free port) for the whole session."""
    with LoopbackSshd(
        ssh_host_keypair.private_pem,
        [ssh_client_keypair.public_line],
        workdir=tmp_path_factory.mktemp("loopback-sshd"),
    ) as sshd:
        yield sshd


@pytest.fixture(scope="session")
def ssh_target(loopback_sshd: LoopbackSshd, ssh_host_keypair: SshKeyPair, ssh_client_keypair: SshKeyPair) -> SshTarget:
    """How to log in to `loopback_sshd`, with its host key pinned."""
    return SshTarget(
        host=loopback_sshd.address,
        port=loopback_sshd.port,
        user=getpass.getuser(),
        host_public_key=ssh_host_keypair.public_line,
        private_key_pem=ssh_client_keypair.private_pem,
    )


@pytest.fixture
def remote_state_dir(tmp_path: Path) -> Path:
    """A state directory "on the instance" (a local directory, as the loopback instance is this machine)."""
    state = tmp_path / "state"
    state.mkdir()
    return state
