"""The server side: :class:`AccessGuard` decides each call, :class:`ServerSecurity` is what a
server enforces, built from :class:`ServerSecuritySettings` and the service's own call table."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from plaudit.services.common.errors import FailedPreconditionError, PermissionDeniedError
from plaudit.services.common.security.keys import (
    ANONYMOUS,
    ApiKeyEntries,
    KeyStore,
    Principal,
    ReloadingKeyStore,
    Role,
    load_keys_file,
    parse_bearer,
)
from plaudit.services.common.security.limits import (
    SMALL_FIELD_COUNT,
    SMALL_MESSAGE_BYTES,
    FieldLimits,
    InFlightLimit,
    MessageLimits,
    RateLimiter,
)
from plaudit.services.common.security.tls import ServerTlsSettings, TlsFiles

log = logging.getLogger(__name__)

CallRoles = Mapping[str, Role]
"""The role each call of a service needs: ``/package.Service/Method`` for gRPC,
``METHOD /route`` for HTTP. Each service declares its own; a call not in it is refused."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CALLER: ContextVar[Principal | None] = ContextVar("plaudit_caller", default=None)
"""The principal of the gRPC call being served, set by the server's interceptor around the
servicer (None outside a call; :data:`~plaudit.services.common.security.keys.ANONYMOUS` while
authentication is off). HTTP handlers read ``request[PRINCIPAL]`` instead."""


@dataclass(frozen=True, eq=False)
class AccessGuard:
    """Decides every call: who is calling (key), may they (``call_roles``), may they now (rate)."""

    keys: KeyStore | ReloadingKeyStore | None
    call_roles: CallRoles
    rate: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    in_flight: InFlightLimit = field(default_factory=lambda: InFlightLimit(0))

    @property
    def auth_required(self) -> bool:
        return self.keys is not None

    def for_calls(self, call_roles: CallRoles) -> AccessGuard:
        """A guard for other calls (e.g. HTTP routes) sharing these keys, buckets and slots."""
        return replace(self, call_roles=call_roles)

    def identify(self, authorization: str | None) -> Principal:
        """The caller (ANONYMOUS while authentication is off); UNAUTHENTICATED if unknown."""
        if self.keys is None:
            return ANONYMOUS
        return self.keys.identify(parse_bearer(authorization))

    def check(self, call: str, authorization: str | None) -> Principal:
        """Admit ``call`` (a key of ``call_roles``) or raise the refusal's domain error."""
        principal = self.identify(authorization)
        if self.keys is not None:
            role = self.call_roles.get(call)
            if role is None:
                raise PermissionDeniedError(f"{call.lstrip('/')} is not open to any API key")
            if role not in principal.roles:
                raise PermissionDeniedError(
                    f"API key {principal.name!r} lacks the role {role!r} "
                    f"needed for {call.lstrip('/')}"
                )
        self.rate.check(principal.name)
        return principal


class ServerSecuritySettings(ServerTlsSettings):
    """Authentication, limits and TLS of a server (:mod:`~plaudit.services.common.security`)."""

    auth_disabled: bool = Field(
        False, description="serve without authentication: anyone may call everything (WARNING)"
    )
    api_keys: ApiKeyEntries = Field(
        [], description='accepted API keys, JSON [{"name", "sha256", "roles"}] (plaudit keys new)'
    )
    api_keys_file: Path | None = Field(None, description="JSON file of more accepted API keys")
    rate_limit_rps: float = Field(
        0.0, ge=0, description="calls per second per API key (0 = no limit)"
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="calls a key may make at once (0 = max(1, rate_limit_rps))"
    )
    max_in_flight: int | None = Field(
        None,
        ge=0,
        description="calls (gRPC and HTTP) served at once before RESOURCE_EXHAUSTED (0 = no "
        "limit; unset: the service's default, sized from its batch settings)",
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="largest gRPC message sent, and ceiling of every call's own request limit",
    )
    max_concurrent_rpcs: int = Field(
        256, ge=1, description="gRPC calls open at once, health included (then RESOURCE_EXHAUSTED)"
    )
    max_concurrent_streams: int = Field(
        64, ge=1, description="gRPC calls open at once on one connection (HTTP/2 streams)"
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="close a gRPC connection this long after it opened (GOAWAY, +/-10%% jitter): "
        "clients reconnect and re-resolve DNS, so new replicas behind a headless Service get "
        "traffic (0 = never)",
    )
    max_connection_age_grace_s: float = Field(
        600.0, ge=0, description="calls still open on an aged connection may finish in this time"
    )

    @classmethod
    def default_help(cls, name: str) -> str:
        if name == "max_in_flight":
            return "default: sized from the service's batch settings"
        return super().default_help(name)

    def default_in_flight(self) -> int:
        """``max_in_flight`` when it is not set; each service sizes its own from its batch
        settings (the calls it can usefully hold at once: more would only wait, parsed, in
        memory)."""
        return 64

    def in_flight_limit(self) -> int:
        """The in-flight limit enforced: ``max_in_flight``, else :meth:`default_in_flight`."""
        return self.default_in_flight() if self.max_in_flight is None else self.max_in_flight

    def message_limits(self) -> MessageLimits:
        """The largest request of each call; each service derives its own from its settings
        (a call not named gets :data:`SMALL_MESSAGE_BYTES`)."""
        return {}

    def field_limits(self) -> FieldLimits:
        """The most protobuf fields a request of each call may hold; each service derives its
        own from its settings with :func:`~plaudit.services.common.security.limits.field_limit`
        (a call not named gets :data:`SMALL_FIELD_COUNT`)."""
        return {}


@dataclass(frozen=True)
class ServerSecurity:
    """What :class:`~plaudit.services.common.server.GrpcService` enforces, built from settings."""

    guard: AccessGuard
    tls: TlsFiles | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    message_limits: MessageLimits = field(default_factory=dict)
    field_limits: FieldLimits = field(default_factory=dict)
    max_concurrent_rpcs: int | None = None
    max_concurrent_streams: int | None = None
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 0.0

    def message_limit(self, call: str) -> int:
        """The largest request ``call`` may send: its own limit (:data:`SMALL_MESSAGE_BYTES` if
        it has none), never above ``max_message_bytes``."""
        return min(self.message_limits.get(call, SMALL_MESSAGE_BYTES), self.max_message_bytes)

    def field_limit(self, call: str) -> int:
        """The most fields a request of ``call`` may hold (:data:`SMALL_FIELD_COUNT` if it has
        no limit of its own), counted before it is parsed."""
        return self.field_limits.get(call, SMALL_FIELD_COUNT)

    @property
    def receive_limit(self) -> int:
        """What gRPC itself receives: the largest of the calls' limits (health and reflection
        are bounded by it too)."""
        return max(map(self.message_limit, [*self.message_limits, ""]))

    @classmethod
    def from_settings(
        cls, settings: ServerSecuritySettings, *, call_roles: CallRoles
    ) -> ServerSecurity:
        """Load keys and check TLS files; refuse a server with no keys unless auth is off.
        ``call_roles`` are the calls this server serves (any other is refused to every key)."""
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
        tls = settings.tls_files()
        if settings.auth_disabled:
            log.warning(
                "authentication is DISABLED: anyone who can reach this server may call every "
                "method (configure API keys for anything but local use)",
                extra={"once": "auth-disabled"},  # said once per process tree
            )
        try:
            keys: KeyStore | ReloadingKeyStore | None = (
                None if settings.auth_disabled else KeyStore(entries)
            )
        except ValueError as exc:  # duplicate names or hashes
            raise FailedPreconditionError(str(exc)) from exc
        if isinstance(keys, KeyStore) and settings.api_keys_file is not None:
            # the file's keys rotate without a restart
            keys = ReloadingKeyStore(list(settings.api_keys), settings.api_keys_file, keys)
        guard = AccessGuard(
            keys,
            call_roles,
            rate=RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst),
            in_flight=InFlightLimit(settings.in_flight_limit()),
        )
        return cls(
            guard,
            tls,
            settings.max_message_bytes,
            message_limits=settings.message_limits(),
            field_limits=settings.field_limits(),
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_concurrent_streams=settings.max_concurrent_streams,
            max_connection_age_s=settings.max_connection_age_s,
            max_connection_age_grace_s=settings.max_connection_age_grace_s,
        )

    def describe(self) -> dict[str, Any]:
        """For the start-up log line."""
        transport = "plaintext"
        if self.tls is not None:
            transport = "mutual-tls" if self.tls.client_ca_file else "tls"
        keys = self.guard.keys
        return {"transport": transport, "auth": "disabled" if keys is None else f"{len(keys)} keys"}
