"""The calling side: the API key and TLS of this process's outgoing channels."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, SecretStr, model_validator

from plaudit.services.common.settings import PlauditSettings


class ClientSecuritySettings(PlauditSettings):
    """How this process calls Plaudit services: API key and TLS of its outgoing channels."""

    api_key: SecretStr = Field(
        SecretStr(""), description="API key sent as 'authorization: Bearer' (empty: none)"
    )
    tls_ca_file: Path | None = Field(
        None, description="PEM CA of the servers' certificates: connect with TLS"
    )
    tls_client_cert_file: Path | None = Field(
        None, description="PEM client certificate for mutual TLS"
    )
    tls_client_key_file: Path | None = Field(None, description="PEM key of tls_client_cert_file")

    @model_validator(mode="after")
    def _client_tls_complete(self) -> ClientSecuritySettings:
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file go together")
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("a client certificate needs TLS: set tls_ca_file")
        return self

    @property
    def credentials(self) -> ClientCredentials:
        return ClientCredentials(
            api_key=self.api_key.get_secret_value(),
            ca_file=self.tls_ca_file,
            cert_file=self.tls_client_cert_file,
            key_file=self.tls_client_key_file,
        )


class _ClientCallDetails(
    collections.namedtuple(  # grpc's own examples build call details this way
        "_ClientCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncKeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of a blocking channel."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Every kind of call: the same details plus the header (``request`` may be a stream)."""
        details = _ClientCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        return continuation(details, request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = (
        intercept_unary_unary
    )


class _AioKeyInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of an asyncio channel."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Every kind of call: the same details plus the header (``request`` may be a stream)."""
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(details, request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = (
        intercept_unary_unary
    )


@dataclass(frozen=True)
class ClientCredentials:
    """An optional API key and TLS files; makes channels that use them.

    ``ca_file`` switches the channel to TLS (the server's certificate must chain to it);
    ``cert_file``/``key_file`` add a client certificate (mutual TLS).
    """

    api_key: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to ``address`` (close it, or use it as a context manager)."""
        creds = self._channel_credentials()
        base = (
            grpc.insecure_channel(address, options=list(options))
            if creds is None
            else grpc.secure_channel(address, creds, options=list(options))
        )
        if not self.api_key:
            return base
        return grpc.intercept_channel(base, _SyncKeyInterceptor(self.api_key))

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``address`` (create it on the loop that will use it)."""
        interceptors = [_AioKeyInterceptor(self.api_key)] if self.api_key else None
        creds = self._channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(
                address, options=list(options), interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            address, creds, options=list(options), interceptors=interceptors
        )


INSECURE = ClientCredentials()
"""No key, plaintext: for services started with ``--auth-disabled`` on this machine."""
