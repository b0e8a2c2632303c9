"""A local mail server (aiosmtpd) on 127.0.0.1 for the embedded default and the tests: the run's e-mails land here.

Every accepted message is kept in a Maildir folder (`mailbox`, readable with any mail client or `mailbox.Maildir`)
and in memory (`received`). As strict as a real submission server where it matters: with `credentials` it requires
AUTH, and, like real servers (and aiosmtpd's default), it offers AUTH only after STARTTLS; with `tls` it offers
STARTTLS with a certificate for 127.0.0.1 and, with `require_starttls`, refuses mail before it. `fail_next` makes the
next transactions answer a 4xx/5xx as a server in trouble would.
"""

from __future__ import annotations

import email
import email.policy
import logging
import mailbox
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from embedded.process import Managed, free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    # The login the client authenticated as (None: no AUTH); whether the session was encrypted (STARTTLS).
    login: str | None
    tls: bool


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate (and its key) for 127.0.0.1; `cert` is also the CA a client must trust."""

    cert: Path
    key: Path

    @classmethod
    def self_signed(cls, folder: Path) -> TlsFiles:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(folder / "smtp-cert.pem", folder / "smtp-key.pem")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.touch(mode=0o600)
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return files


class LocalSmtpServer(Managed):
    """aiosmtpd's Controller on 127.0.0.1 (its own thread and event loop), storing what it accepts in a Maildir."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        credentials: tuple[str, str] | None = None,
        tls: TlsFiles | None = None,
        require_starttls: bool = False,
    ) -> None:
        self.mailbox_dir = workdir / "mailbox"
        self.port = port or free_port()
        self._credentials = credentials
        self._tls = tls
        self._require_starttls = require_starttls
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._faults: list[str] = []
        self._controller: Any = None

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        # Maildir makes its cur/new/tmp folders only when it makes the folder itself.
        self.mailbox_dir.parent.mkdir(parents=True, exist_ok=True)
        mailbox.Maildir(self.mailbox_dir, create=True)
        tls_context = None
        if self._tls is not None:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(self._tls.cert, self._tls.key)
        self._controller = Controller(
            _Handler(self),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=tls_context,
            require_starttls=self._require_starttls,
            authenticator=self._authenticate if self._credentials else None,
            auth_required=self._credentials is not None,
            # aiosmtpd's default, said out loud: no password travels in clear text.
            auth_require_tls=True,
        )
        self._controller.start()
        log.info("SMTP server on 127.0.0.1:%d, mailbox %s", self.port, self.mailbox_dir)

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def fail_next(self, n: int = 1, reply: str = "451 4.3.0 Local error in processing") -> None:
        """The next `n` messages are refused with `reply` at the end of DATA (4xx: try later, 5xx: give up)."""
        with self._lock:
            self._faults += [reply] * n

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (
            self._credentials is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == self._credentials
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _deliver(self, envelope: Any, session: Any) -> str:
        with self._lock:
            if self._faults:
                return self._faults.pop(0)
        parsed = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        login = session.auth_data.login.decode() if session.authenticated and session.auth_data else None
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            message=parsed,
            login=login,
            tls=session.ssl is not None,
        )
        mailbox.Maildir(self.mailbox_dir, create=False).add(envelope.original_content)
        with self._lock:
            self._received.append(received)
        log.info("SMTP server accepted a message to %s: %s", ", ".join(received.rcpt_tos), parsed["Subject"])
        return "250 2.0.0 OK: queued"


class _Handler:
    def __init__(self, server: LocalSmtpServer) -> None:
        self._server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return self._server._deliver(envelope, session)
