"""A real FTPS server for tests (pyftpdlib, explicit TLS required on control and data), its
certificates made by the test (a CA and a server certificate for 127.0.0.1), and a switch
that cuts the next uploads' connections part-way through the file."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import TLS_DTPHandler, TLS_FTPHandler
from pyftpdlib.servers import FTPServer

from tests.support.procs import free_port


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A CA (``ca.pem``) and a server certificate + key for 127.0.0.1 signed by it (``server.pem``)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("dicomflow test CA")).issuer_name(_name("dicomflow test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, server_path = folder / "ca.pem", folder / "server.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, server_path


@dataclass
class FtpsServer:
    """pyftpdlib with TLS required, one user, serving `root`, in a thread of the test process.

    `drop_uploads`: how many of the next uploads are cut (control and data connection closed)
    once `drop_after` bytes of the file have arrived.
    """

    root: Path
    certfile: Path
    username: str = "researcher"
    password: str = "ftps-test-password-0123"
    port: int = field(default_factory=free_port)
    drop_uploads: int = 0
    drop_after: int = 40_000
    #: For each TLS data connection that received data: did it resume the control connection's session?
    data_sessions_reused: list = field(default_factory=list)

    def start(self) -> FtpsServer:
        server_state = self
        self.root.mkdir(parents=True, exist_ok=True)

        class Dtp(TLS_DTPHandler):
            def handle_read_event(self) -> None:   # what the IO loop calls (DTPHandler aliases handle_read)
                super().handle_read_event()
                if self.tot_bytes_received and not getattr(self, "_noted", False):
                    self._noted = True
                    # pyOpenSSL has no public call for it: OpenSSL's own SSL_session_reused
                    reused = SSL._lib.SSL_session_reused(self.socket._ssl)
                    server_state.data_sessions_reused.append(bool(reused))
                if server_state.drop_uploads and self.receive and self.tot_bytes_received >= server_state.drop_after:
                    server_state.drop_uploads -= 1
                    self.cmd_channel.close()    # as a server that goes away mid-file
                    self.close()

        class Handler(TLS_FTPHandler):
            certfile = str(self.certfile)
            tls_control_required = True
            tls_data_required = True
            dtp_handler = Dtp
            passive_ports = None
            auth_failed_timeout = 0.1   # pyftpdlib answers a wrong password after 3 s by default

            def log(self, *args, **kwargs) -> None:
                pass

            def logline(self, *args, **kwargs) -> None:
                pass

        authorizer = DummyAuthorizer()
        authorizer.add_user(self.username, self.password, str(self.root), perm="elradfmwMT")
        Handler.authorizer = authorizer
        self._server = FTPServer(("127.0.0.1", self.port), Handler)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ftps-server", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        self._server.close_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ftps://127.0.0.1:{self.port}"

    def files(self) -> dict[str, bytes]:
        """Every file on the server, by its path relative to the root."""
        return {p.relative_to(self.root).as_posix(): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file()}
