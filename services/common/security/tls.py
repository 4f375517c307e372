"""A server's TLS: its settings (certificate, key, optional client CA) and the files, loaded."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, model_validator

from plaudit.services.common.settings import PlauditSettings

log = logging.getLogger(__name__)

TLS_FILES_CHECK_S = 1.0
"""How often (at most) a server looks whether its certificate, key or client CA changed."""


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS material: read at start-up, and again when the files change.

    Certificates rotate without a restart (issue 17 item 8): the gRPC server's credentials are
    dynamic (gRPC asks :meth:`_fetch` before every new connection's handshake) and the HTTP
    server's context reloads its chain on a new connection's handshake (``sni_callback``); both
    look at the files' mtime, size and inode at most every :data:`TLS_FILES_CHECK_S`.
    Connections already open keep the certificate they started with. A certificate and key that
    do not load together (a rotation half done) are refused with an ERROR and the previous ones
    kept, until the files change again.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    _state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def _files(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None]

    def _stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            stats = [os.stat(p) for p in self._files()]
        except OSError:
            return None
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)

    def _changed(self, key: str) -> bool:
        """Whether the files changed since ``key``'s last look (throttled, thread-safe)."""
        lock = self._state.setdefault("lock", threading.Lock())
        now = time.monotonic()
        with lock:
            if now < self._state.get(f"{key}:next", 0.0):
                return False
            self._state[f"{key}:next"] = now + TLS_FILES_CHECK_S
            stamp = self._stamp()
            if stamp is None or stamp == self._state.get(f"{key}:stamp"):
                return False
            self._state[f"{key}:stamp"] = stamp
            return True

    def _certificate_configuration(self) -> Any:
        cert, key = self.cert_file.read_bytes(), self.key_file.read_bytes()
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the pair loads together, or raise
        check.load_cert_chain(self.cert_file, self.key_file)
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def _fetch(self) -> Any:
        """gRPC's per-handshake question: a new certificate configuration, or None (no change)."""
        if not self._changed("grpc"):
            return None
        try:
            config = self._certificate_configuration()
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.error(
                "TLS files not reloaded; the previous certificate stays in force",
                extra={"cert_file": str(self.cert_file), "error": str(exc)[:300]},
            )
            return None
        log.warning("TLS certificate reloaded (gRPC)", extra={"cert_file": str(self.cert_file)})
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        self._changed("grpc")  # the files as they are now: what the initial configuration holds
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_configuration(),
            self._fetch,
            require_client_authentication=self.client_ca_file is not None,
        )

    def _http_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTP: the same certificate; client certificates are not asked for (browsers).
        Each handshake switches to a context with the current files (reloaded when changed)."""
        context = self._http_context()
        self._changed("http")
        current = [context]

        def reload(sock: Any, _server_name: str | None, _context: ssl.SSLContext) -> None:
            if self._changed("http"):
                try:
                    current[0] = self._http_context()
                except (OSError, ssl.SSLError) as exc:
                    log.error(
                        "TLS files not reloaded; the previous certificate stays in force",
                        extra={"cert_file": str(self.cert_file), "error": str(exc)[:300]},
                    )
                else:
                    log.warning(
                        "TLS certificate reloaded (HTTP)", extra={"cert_file": str(self.cert_file)}
                    )
            if current[0] is not context:
                sock.context = current[0]  # this handshake already uses the new certificate
            return None

        context.sni_callback = reload
        return context


class ServerTlsSettings(PlauditSettings):
    """TLS of a server: certificate and key together; a client CA only with them (mutual TLS)."""

    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerTlsSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def tls_files(self) -> TlsFiles | None:
        """The configured files (each checked to exist), or None to serve plaintext."""
        cert, key, client_ca = self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file
        if cert is None or key is None:
            return None
        for path in (cert, key, client_ca):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"TLS file {path} does not exist")
        return TlsFiles(cert, key, client_ca)
