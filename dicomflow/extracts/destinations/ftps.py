"""FTPS uploads (explicit TLS, passive mode, verified certificate) in PIXL's remote layout.

A study's DICOM goes as one zip, ``<base>/<project-slug>/<pseudonymised-study-id>.zip``; a
Parquet extract as its files, ``<base>/<project-slug>/<extract-datetime>/parquet/...``. Each
file is written under a hidden temporary name in the same folder (``.<name>.part``), its
size checked, and renamed when complete: a reader never sees half a file under the final
name. A dropped connection is retried (`attempts`, with back-off) on a new connection; the
retry overwrites the same temporary name, so nothing is left behind once it succeeds.
"""

from __future__ import annotations

import ftplib
import logging
import posixpath
import ssl
import time
import zipfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dicomflow.extracts.destinations.errors import (
    DestinationAuthError,
    DestinationConfigError,
    DestinationUnavailableError,
)
from dicomflow.extracts.destinations.secrets import Credentials
from dicomflow.extracts.destinations.settings import DestinationSettings

log = logging.getLogger(__name__)

#: What a dropped or refused connection looks like from ftplib (4xx replies are temporary too).
TRANSIENT = (OSError, EOFError, ftplib.error_temp, ftplib.error_reply, ftplib.error_proto)
#: Bytes per write on the data connection.
BLOCK = 1 << 16


def extract_slug(extract_time: datetime) -> str:
    """The remote folder name of an extract's time: the local extract folder's name (PIXL-like,
    ``2026-12-02t16-55-03``, UTC), so both sides read the same."""
    from dicomflow.extracts.parquet import extract_name  # pyarrow: only Parquet uploads need it

    return extract_name(extract_time)


def write_zip(files: list[Path], root: Path, target: Path) -> None:
    """Zip `files` (names relative to `root`, sorted) into `target`, stored, with fixed dates:
    the same files always give the same bytes (a retry uploads an identical zip)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with path.open("rb") as src, archive.open(info, "w") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


class _FtpTls(ftplib.FTP_TLS):
    """ftplib's FTP_TLS whose data connections resume the control connection's TLS session:
    servers that require it (vsftpd's require_ssl_reuse, FileZilla Server) refuse them otherwise."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


class FtpsUploader:
    """Uploads files to one FTPS destination over one connection, reopened after a failure."""

    def __init__(self, name: str, credentials: Credentials, settings: DestinationSettings,
                 take_tokens: Callable[[int], None]):
        self.name = name
        self.credentials = credentials
        self.settings = settings
        self.take_tokens = take_tokens
        parts = urlsplit(credentials.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 21
        self.base = unquote(parts.path).strip("/")
        self._ftp: ftplib.FTP_TLS | None = None

    def remote(self, *parts: str) -> str:
        """A path under the destination's base folder."""
        return posixpath.join(self.base, *parts) if self.base else posixpath.join(*parts)

    def close(self) -> None:
        if self._ftp is not None:
            try:
                self._ftp.quit()
            except (*TRANSIENT, ftplib.error_perm):
                self._ftp.close()
            self._ftp = None

    def _connect(self) -> ftplib.FTP_TLS:
        context = ssl.create_default_context(
            cafile=str(self.credentials.ca_file) if self.credentials.ca_file else None)
        ftp = _FtpTls(context=context, timeout=self.settings.timeout)
        try:
            ftp.connect(self.host, self.port)
            ftp.auth()                      # explicit TLS: AUTH TLS before the credentials go
            ftp.login(self.credentials.username, self.credentials.password)
            ftp.prot_p()                    # the data connections are TLS too
            ftp.set_pasv(True)
        except ssl.SSLCertVerificationError as exc:
            ftp.close()
            raise DestinationConfigError(self.name, f"the server's certificate is not trusted ({exc.verify_message}); "
                                                    "give the CA that signed it as the destination's caFile") from exc
        except ftplib.error_perm as exc:
            ftp.close()
            if str(exc).startswith("530"):
                raise DestinationAuthError(self.name, f"the server refused the login: {exc}") from exc
            raise DestinationUnavailableError(self.name, f"the server refused the session: {exc}") from exc
        except BaseException:
            ftp.close()
            raise
        return ftp

    def _session(self) -> ftplib.FTP_TLS:
        if self._ftp is None:
            self._ftp = self._connect()
        return self._ftp

    def _makedirs(self, ftp: ftplib.FTP_TLS, folder: str) -> None:
        path = ""
        for part in folder.split("/"):
            if not part:
                continue
            path = f"{path}/{part}" if path else part
            try:
                ftp.mkd(path)
            except ftplib.error_perm:
                pass  # there already (or not allowed: the STOR below then says so)

    def upload(self, local: Path, remote: str, tokens: int) -> None:
        """Upload `local` to `remote` under a temporary name, check its size, rename it.

        Raises:
            ftplib.error_perm: the server refused the file for good (the caller records it).
            DestinationUnavailableError: the connection failed through every attempt.
            DestinationAuthError, DestinationConfigError: from the login / certificate.
            DestinationBusyError: no rate-limit token within the bounded wait.
        """
        self.take_tokens(tokens)
        folder, base = posixpath.split(remote)
        temporary = posixpath.join(folder, f".{base}.part")
        size = local.stat().st_size
        last = ""
        for attempt in range(self.settings.attempts):
            if attempt:
                time.sleep(self.settings.backoff(attempt - 1))
            try:
                ftp = self._session()
                self._makedirs(ftp, folder)
                with local.open("rb") as fh:
                    ftp.storbinary(f"STOR {temporary}", fh, blocksize=BLOCK)
                landed = ftp.size(temporary)
                if landed != size:
                    raise ftplib.error_temp(f"451 {temporary} has {landed} bytes on the server, {size} were sent")
                try:
                    ftp.rename(temporary, remote)
                except ftplib.error_perm:
                    ftp.delete(remote)      # servers that do not rename over a file (a forced re-export)
                    ftp.rename(temporary, remote)
                return
            except TRANSIENT as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("destination %s: upload of %s, attempt %d of %d failed: %s", self.name, remote,
                            attempt + 1, self.settings.attempts, last)
                if self._ftp is not None:
                    self._ftp.close()
                    self._ftp = None
        raise DestinationUnavailableError(self.name, f"upload of {remote} failed {self.settings.attempts} times; "
                                                     f"last: {last}")
