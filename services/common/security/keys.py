"""API keys, the roles they carry, and the caller a presented key identifies."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from plaudit.services.common.errors import UnauthenticatedError

Role = Literal["score", "generate", "submit_feedback", "read_feedback", "admin"]
"""Roles are independent: none implies another (``admin`` is only AdminService)."""
ROLES: tuple[Role, ...] = typing.get_args(Role)

API_KEY_PREFIX = "plaudit_"
MAX_KEY_CHARS = 512


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


ApiKeyEntries = Annotated[list[ApiKeyEntry], BeforeValidator(_parse_entries)]
"""Entries from JSON text, one JSON text per CLI word, or parsed objects."""


def load_keys_file(path: Path) -> list[ApiKeyEntry]:
    """Entries from a JSON file: a list of entries, or ``{"keys": [...]}``."""
    return [ApiKeyEntry.model_validate(item) for item in _parse_entries(path.read_text())]
