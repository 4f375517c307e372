"""A server's TLS: its settings (certificate, key, optional client CA) and the files, loaded."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import Field, model_validator

from plaudit.services.common.settings import PlauditSettings


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS material, read at start-up."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTP: the same certificate; client certificates are not asked for (browsers)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
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
