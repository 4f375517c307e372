"""API keys, the roles they carry, and the caller a presented key identifies."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from plaudit.services.common.errors import UnauthenticatedError

log = logging.getLogger(__name__)

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


KEYS_FILE_CHECK_S = 1.0
"""How often (at most) a server looks whether its keys file changed: on use, one ``stat``."""


class ReloadingKeyStore:
    """The inline keys plus those of ``path``, re-read when the file changes, so keys rotate
    without a restart (issue 17 item 8).

    On use, at most every ``check_interval_s``, the file is ``stat``-ed; when its mtime, size or
    inode changed (a Kubernetes Secret update swaps a symlink: a new inode) it is read and the
    key set replaced in one assignment: a call admitted before keeps going, the next call is
    decided by the new set. A file that does not parse, does not validate, is missing, or would
    leave no key at all (a half-written file) is refused with an ERROR and the previous set kept;
    the next change of the file is tried again.
    """

    def __init__(
        self,
        inline: Sequence[ApiKeyEntry],
        path: Path,
        initial: KeyStore,
        *,
        check_interval_s: float = KEYS_FILE_CHECK_S,
    ) -> None:
        self.path = path
        self._inline = list(inline)
        self._store = initial
        self._interval = check_interval_s
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._next_check = time.monotonic() + check_interval_s

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> KeyStore:
        """The key set in force, after a look at the file when one is due."""
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:  # one caller looks; the others go on with the set in force
                self._next_check = now + self._interval
                self.reload_if_changed()
            finally:
                self._lock.release()
        return self._store

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed since the last look; True if the set was replaced."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries = self._inline + load_keys_file(self.path)
            if not entries:
                raise ValueError("no keys left (refused: stop the server to shut every key out)")
            store = KeyStore(entries)
        except (OSError, ValueError) as exc:
            log.error(
                "API keys file not reloaded; the previous keys stay in force",
                extra={"path": str(self.path), "error": str(exc)[:300]},
            )
            return False
        self._store = store
        log.warning("API keys reloaded", extra={"path": str(self.path), "keys": len(store)})
        return True

    def __len__(self) -> int:
        return len(self.current())

    def identify(self, key: str) -> Principal:
        """The principal of ``key`` in the current set; UNAUTHENTICATED when none matches."""
        return self.current().identify(key)
