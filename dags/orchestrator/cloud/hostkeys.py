"""SSH keys made for one run: the instance's pinned host key, and the public line of a client key.

The host key is generated here and handed to the instance through user-data, so the SSH client can pin it
from the first connection on instead of trusting whatever key answers (never accept-on-first-use).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from orchestrator.errors import OrchestratorError


class HostKeyError(OrchestratorError):
    """A private key could not be read."""


@dataclass(frozen=True)
class HostKey:
    """An Ed25519 key pair in the formats OpenSSH and cloud-init use."""

    # repr=False: the private half must never reach a log line or a traceback.
    private_openssh: str = field(repr=False)
    public_line: str
    fingerprint_sha256: str


def _fingerprint(public_line: str) -> str:
    """The `SHA256:...` fingerprint `ssh-keygen -l` prints: unpadded base64 of the key blob's digest."""
    blob = base64.b64decode(public_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def generate_host_key() -> HostKey:
    """A fresh Ed25519 host key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode("ascii")
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    return HostKey(private_openssh=private, public_line=public, fingerprint_sha256=_fingerprint(public))


def public_line_from_private(private_pem: str) -> str:
    """The `<type> <base64>` public line of an unencrypted private key (OpenSSH or PKCS#8/PEM format)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    key: PrivateKeyTypes
    data = private_pem.strip().encode("ascii")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnicodeError) as exc:
        # The message from cryptography never contains key material; it only says what is wrong.
        raise HostKeyError(
            f"cannot read the SSH private key ({exc}): use an unencrypted OpenSSH or PEM private key "
            "in the SSH connection's private_key extra"
        ) from None
    try:
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError, AttributeError) as exc:
        raise HostKeyError(
            f"the SSH private key type is not usable for SSH ({type(key).__name__}): use an Ed25519, RSA or ECDSA key"
        ) from exc
    return public.decode("ascii")
