"""Who may call what: API keys with roles, rate and concurrency limits, TLS (every service).

Callers present an API key as ``authorization: Bearer <key>`` (gRPC metadata, or the HTTP header
of the feedback service's JSON API). Servers are configured with the keys' sha256 digests only
(``api_keys`` / ``api_keys_file``, entries made by ``plaudit keys new``); the digest of a presented
key is compared with every configured digest by :func:`hmac.compare_digest`, whatever matches. A
key carries roles, and each call needs the one role :data:`CALL_ROLES` names for it; a call the
table does not name is refused to every key. Health and reflection stay open. A missing or
unknown key is UNAUTHENTICATED, a known key without the role PERMISSION_DENIED.

Authentication is off only when asked for (``auth_disabled``); a server with neither keys nor
that setting refuses to start, and one running without authentication logs a WARNING.

Per key, a token bucket limits the call rate (``rate_limit_rps``, ``rate_limit_burst``); per
process, ``max_in_flight`` bounds the calls being served at once. Both answer RESOURCE_EXHAUSTED.
gRPC serves TLS when given a certificate and key, and requires client certificates signed by
``tls_client_ca_file`` when that is set (mutual TLS).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import math
import secrets
import ssl
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.common.errors import (
    FailedPreconditionError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from services.common.settings import PlauditSettings

log = logging.getLogger(__name__)

Role = Literal["score", "generate", "submit_feedback", "read_feedback", "admin"]
ROLES: tuple[Role, ...] = typing.get_args(Role)

CALL_ROLES: dict[str, Role] = {
    # gRPC: /package.Service/Method
    "/plaudit.v1.RewardService/Score": "score",
    "/plaudit.v1.RewardService/Compare": "score",
    "/plaudit.v1.RewardService/GetModel": "score",
    "/plaudit.v1.GenerationService/Generate": "generate",
    "/plaudit.v1.FeedbackService/SubmitComparison": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitRanking": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitRating": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitCorrection": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitBatch": "submit_feedback",
    "/plaudit.v1.FeedbackService/ExportPreferences": "read_feedback",
    "/plaudit.v1.FeedbackService/GetStats": "read_feedback",
    "/plaudit.v1.AdminService/ReloadModel": "admin",
    # HTTP (the feedback service's JSON API): METHOD /route
    "POST /api/v1/comparisons": "submit_feedback",
    "POST /api/v1/rankings": "submit_feedback",
    "POST /api/v1/ratings": "submit_feedback",
    "POST /api/v1/corrections": "submit_feedback",
    "POST /api/v1/tasks": "submit_feedback",
    "GET /api/v1/tasks/next": "submit_feedback",
    "GET /api/v1/tasks/{task_id}": "submit_feedback",
    "POST /api/v1/tasks/{task_id}/skip": "submit_feedback",
    "GET /api/v1/stats": "read_feedback",
}
"""The role each call needs (roles do not imply each other: ``admin`` is only AdminService)."""

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods anyone may call: health checks and server reflection."""

API_KEY_PREFIX = "plaudit_"
MAX_KEY_CHARS = 512
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def hash_key(key: str) -> str:
    """The hex sha256 of an API key: what the server configuration holds."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_api_key() -> str:
    """A fresh random key (256 bits), so a plain sha256 of it cannot be reversed."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeyEntry(BaseModel):
    """One accepted key, as configured: a name (for logs and rate limits), its sha256, roles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    roles: tuple[Role, ...] = Field(min_length=1)


@dataclass(frozen=True)
class Principal:
    """The caller a key identifies."""

    name: str
    roles: frozenset[Role]


ANONYMOUS = Principal("anonymous", frozenset(ROLES))
"""Every caller while authentication is disabled."""


def parse_bearer(authorization: str | None) -> str:
    """The key in an ``authorization: Bearer <key>`` value; UNAUTHENTICATED if there is none."""
    if not authorization:
        raise UnauthenticatedError(
            "an API key is required: send the header 'authorization: Bearer <API key>'"
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise UnauthenticatedError("the authorization header must be 'Bearer <API key>'")
    if len(key) > MAX_KEY_CHARS:
        raise UnauthenticatedError("unknown API key")
    return key


class KeyStore:
    """The configured keys; :meth:`identify` finds the caller in constant time per entry."""

    def __init__(self, entries: Sequence[ApiKeyEntry]) -> None:
        names = [e.name for e in entries]
        digests = [e.sha256.lower() for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("api_keys: key names must be unique")
        if len(set(digests)) != len(digests):
            raise ValueError("api_keys: the same key hash is configured twice")
        self._entries = [
            (bytes.fromhex(e.sha256), Principal(e.name, frozenset(e.roles))) for e in entries
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, key: str) -> Principal:
        """The principal of ``key``; UNAUTHENTICATED when no entry matches."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for expected, principal in self._entries:  # every entry compared: no early exit
            if hmac.compare_digest(digest, expected) and found is None:
                found = principal
        if found is None:
            raise UnauthenticatedError("unknown API key")
        return found


class RateLimiter:
    """A token bucket per caller name: ``rate`` calls per second, up to ``burst`` at once."""

    def __init__(
        self, rate: float, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, updated)
        self._lock = threading.Lock()

    def check(self, name: str) -> None:
        """Take a token for ``name``; RESOURCE_EXHAUSTED when its bucket is empty."""
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            tokens, updated = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise ResourceExhaustedError(
                    f"rate limit of {self.rate:g} calls/s for {name!r} exceeded; "
                    f"retry in {wait:.2f} s"
                )
            self._buckets[name] = (tokens - 1.0, now)


class InFlightLimit:
    """At most ``limit`` calls served at once (0: no limit); the rest RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.limit and self.current >= self.limit:
                raise ResourceExhaustedError(
                    f"the server is serving its limit of {self.limit} calls; retry later"
                )
            self.current += 1
        try:
            yield
        finally:
            with self._lock:
                self.current -= 1


class AccessGuard:
    """Decides every call: who is calling (key), may they (role), may they now (rate)."""

    def __init__(
        self,
        keys: KeyStore | None,
        *,
        rate: RateLimiter | None = None,
        in_flight: InFlightLimit | None = None,
    ) -> None:
        self.keys = keys
        self.rate = rate or RateLimiter(0)
        self.in_flight = in_flight or InFlightLimit(0)

    @property
    def auth_required(self) -> bool:
        return self.keys is not None

    def identify(self, authorization: str | None) -> Principal:
        """The caller (ANONYMOUS while authentication is off); UNAUTHENTICATED if unknown."""
        if self.keys is None:
            return ANONYMOUS
        return self.keys.identify(parse_bearer(authorization))

    def check(self, call: str, authorization: str | None) -> Principal:
        """Admit ``call`` (a key of :data:`CALL_ROLES`) or raise the refusal's domain error."""
        principal = self.identify(authorization)
        if self.keys is not None:
            role = CALL_ROLES.get(call)
            if role is None:
                raise PermissionDeniedError(f"{call.lstrip('/')} is not open to any API key")
            if role not in principal.roles:
                raise PermissionDeniedError(
                    f"API key {principal.name!r} lacks the role {role!r} "
                    f"needed for {call.lstrip('/')}"
                )
        self.rate.check(principal.name)
        return principal


# -- configuration ---------------------------------------------------------------------------
def _parse_entries(value: Any) -> Any:
    """Accept a JSON text, a list of JSON texts (one per CLI word), or parsed entries."""
    if isinstance(value, str | bytes):
        value = json.loads(value) if value.strip() else []
    if isinstance(value, dict):
        value = value.get("keys", [value])
    if isinstance(value, list | tuple):
        out: list[Any] = []
        for item in value:
            parsed = json.loads(item) if isinstance(item, str) else item
            out.extend(parsed if isinstance(parsed, list) else [parsed])
        return out
    return value


def load_keys_file(path: Path) -> list[ApiKeyEntry]:
    """Entries from a JSON file: a list of entries, or ``{"keys": [...]}``."""
    raw = _parse_entries(path.read_text())
    return [ApiKeyEntry.model_validate(item) for item in raw]


class ServerSecuritySettings(PlauditSettings):
    """Authentication, limits and TLS of a service's server (see the module doc)."""

    auth_disabled: bool = Field(
        False, description="serve without authentication: anyone may call everything (WARNING)"
    )
    api_keys: list[ApiKeyEntry] = Field(
        [], description='accepted API keys, JSON [{"name", "sha256", "roles"}] (plaudit keys new)'
    )
    api_keys_file: Path | None = Field(None, description="JSON file of more accepted API keys")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    rate_limit_rps: float = Field(
        0.0, ge=0, description="calls per second per API key (0 = no limit)"
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="calls a key may make at once (0 = max(1, rate_limit_rps))"
    )
    max_in_flight: int = Field(
        0, ge=0, description="calls served at once before RESOURCE_EXHAUSTED (0 = no limit)"
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="largest gRPC message received or sent"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _json_entries(cls, value: Any) -> Any:
        return _parse_entries(value)

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerSecuritySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self


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


@dataclass(frozen=True)
class ServerSecurity:
    """What :class:`~services.common.server.GrpcService` enforces, built from settings."""

    guard: AccessGuard
    tls: TlsFiles | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def from_settings(cls, settings: ServerSecuritySettings) -> ServerSecurity:
        """Load keys and check TLS files; refuse a server with no keys unless auth is off."""
        entries = list(settings.api_keys)
        if settings.api_keys_file is not None:
            try:
                entries += load_keys_file(settings.api_keys_file)
            except ValueError as exc:  # not JSON, or entries that do not validate
                raise FailedPreconditionError(
                    f"api_keys_file {settings.api_keys_file}: {exc}"
                ) from exc
        if settings.auth_disabled and entries:
            raise FailedPreconditionError(
                "auth_disabled is set but API keys are configured: choose one"
            )
        if not settings.auth_disabled and not entries:
            raise FailedPreconditionError(
                "no API keys configured: set PLAUDIT_API_KEYS or PLAUDIT_API_KEYS_FILE "
                "(plaudit keys new makes one), or turn authentication off explicitly with "
                "--auth-disabled / PLAUDIT_AUTH_DISABLED=true"
            )
        tls = None
        cert, key, client_ca = (
            settings.tls_cert_file,
            settings.tls_key_file,
            settings.tls_client_ca_file,
        )
        if cert is not None and key is not None:
            for path in (cert, key, client_ca):
                if path is not None and not path.is_file():
                    raise FileNotFoundError(f"TLS file {path} does not exist")
            tls = TlsFiles(cert, key, client_ca)
        if settings.auth_disabled:
            log.warning(
                "authentication is DISABLED: anyone who can reach this server may call every "
                "method (configure API keys for anything but local use)"
            )
        try:
            keys = None if settings.auth_disabled else KeyStore(entries)
        except ValueError as exc:  # duplicate names or hashes
            raise FailedPreconditionError(str(exc)) from exc
        guard = AccessGuard(
            keys,
            rate=RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst),
            in_flight=InFlightLimit(settings.max_in_flight),
        )
        return cls(guard, tls, settings.max_message_bytes)

    def describe(self) -> dict[str, Any]:
        """For the start-up log line."""
        transport = "plaintext"
        if self.tls is not None:
            transport = "mutual-tls" if self.tls.client_ca_file else "tls"
        keys = self.guard.keys
        return {"transport": transport, "auth": "disabled" if keys is None else f"{len(keys)} keys"}


# -- clients ---------------------------------------------------------------------------------
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

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioKeyInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of an asyncio channel."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


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
