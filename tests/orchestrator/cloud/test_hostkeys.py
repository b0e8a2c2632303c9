from __future__ import annotations

import io
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from orchestrator.cloud.hostkeys import HostKeyError, generate_host_key, public_line_from_private
from tests.support.sshd import pem_armor
from tests.support.tools import require_executable


def test_generated_key_loads_in_paramiko_and_matches_its_public_line_and_fingerprint():
    import paramiko

    key = generate_host_key()
    loaded = paramiko.Ed25519Key.from_private_key(io.StringIO(key.private_openssh))
    assert key.public_line == f"{loaded.get_name()} {loaded.get_base64()}"
    assert key.fingerprint_sha256 == loaded.fingerprint
    assert key.private_openssh.startswith(pem_armor("").split("\n")[0])
    assert generate_host_key().public_line != key.public_line


def test_fingerprint_matches_ssh_keygen(tmp_path):
    require_executable("ssh-keygen", "apt-get install -y openssh-client")
    key = generate_host_key()
    path = tmp_path / "key.pub"
    path.write_text(key.public_line + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == key.fingerprint_sha256


def test_repr_hides_the_private_key():
    key = generate_host_key()
    assert "PRIVATE" not in repr(key)
    assert key.fingerprint_sha256 in repr(key)


def test_public_line_from_openssh_private_key():
    key = generate_host_key()
    assert public_line_from_private(key.private_openssh) == key.public_line
    # Connections often store the key with stray whitespace or no final newline.
    assert public_line_from_private("\n" + key.private_openssh.strip() + "  ") == key.public_line


def test_public_line_from_rsa_pem_private_key():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    expected = (
        rsa_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    )
    assert public_line_from_private(pem) == expected
    assert expected.startswith("ssh-rsa ")


def test_unreadable_private_key_says_what_to_use():
    with pytest.raises(
        HostKeyError, match=r"use an unencrypted OpenSSH or PEM private key in the SSH connection's private_key extra$"
    ):
        public_line_from_private(pem_armor("bm90IGEga2V5"))


def test_key_type_without_an_ssh_form_is_named():
    # X25519 is a key-exchange key: cryptography reads it, but it has no OpenSSH public line.
    pem = (
        x25519.X25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    with pytest.raises(
        HostKeyError,
        match=r"^the SSH private key type is not usable for SSH \(X25519PrivateKey\): "
        r"use an Ed25519, RSA or ECDSA key$",
    ):
        public_line_from_private(pem)
