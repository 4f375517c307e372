"""Who labels: the annotator of a call is bound to the API key that made it.

With authentication on, every key is the annotator of its own name: the ``annotator_id`` of a
submission, a task lease or a skip must be empty (it becomes the key's name) or that name, else
PERMISSION_DENIED naming ``annotator_id``. Only the keys named in the feedback service's
``any_annotator_keys`` setting may act for any annotator (batch imports, a front end that
authenticates its own users); they are held to ``max_leases_per_principal`` active task leases.
Idempotency keys are scoped to the caller: what is stored is ``<key name>/<idempotency_key>``
(see :func:`scoped_key`), so one key can neither find nor pre-empt another key's submission.

With authentication off (``auth_disabled``) the caller is anonymous and nothing here applies:
``annotator_id`` is whatever the client says, as before.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field, replace

from plaudit.services.common.errors import PermissionDeniedError, ResourceExhaustedError
from plaudit.services.common.security.keys import ANONYMOUS, Principal
from plaudit.services.feedback.domain import (
    DEFAULT_LIMITS,
    FeedbackEvent,
    FeedbackLimits,
    validate_identifier,
)

HASHED_KEY_MARK = "~"
"""Starts the stored form of an idempotency key too long to be kept after its scope."""


def scoped_key(scope: str, key: str, limits: FeedbackLimits = DEFAULT_LIMITS) -> str:
    """The stored idempotency key of ``key`` sent by the key named ``scope``:
    ``scope/key``, or ``scope/~<base64url sha256 of key>`` when that would exceed
    ``max_id_chars`` (key names are at most 64 characters and never contain ``/``)."""
    validate_identifier("idempotency_key", key, limits)  # the client's key, as sent
    stored = f"{scope}/{key}"
    if len(stored) <= limits.max_id_chars:
        return stored
    digest = base64.urlsafe_b64encode(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest())
    return f"{scope}/{HASHED_KEY_MARK}{digest.decode().rstrip('=')}"


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request, as the feedback service sees it."""

    name: str | None
    """The API key's name; None while authentication is off (nothing is bound then)."""
    any_annotator: bool = False
    """The key may act for any annotator (it is named in ``any_annotator_keys``)."""

    @classmethod
    def of(cls, principal: Principal | None, any_annotator_keys: Collection[str]) -> Caller:
        if principal is None or principal is ANONYMOUS:
            return cls(None)
        return cls(principal.name, principal.name in any_annotator_keys)

    def annotator(self, claimed: str) -> str:
        """The annotator the call acts for: ``claimed``, checked against the key."""
        if self.name is None or self.any_annotator:
            return claimed
        if claimed in ("", self.name):
            return self.name
        raise PermissionDeniedError(
            f"annotator_id: the API key {self.name!r} labels only as the annotator "
            f"{self.name!r}; leave annotator_id empty or set it to {self.name!r} "
            "(each annotator needs their own key)"
        )

    def bind(self, event: FeedbackEvent, limits: FeedbackLimits = DEFAULT_LIMITS) -> FeedbackEvent:
        """``event`` as this caller may submit it: its annotator checked (filled in when
        empty), its idempotency key scoped to the caller."""
        if self.name is None:
            return event
        return replace(
            event,
            annotator_id=self.annotator(event.annotator_id),
            idempotency_key=scoped_key(self.name, event.idempotency_key, limits),
        )


@dataclass
class LeaseLimit:
    """At most ``limit`` annotators with an active task lease per API key (0: no limit).

    Kept in memory, per process: a lease counts from when it is handed out until the annotator
    labels or skips a task through this key, or the lease (``lease_ms``) runs out."""

    limit: int
    _held: dict[str, dict[str, int]] = field(default_factory=dict)

    def reserve(self, caller: Caller, annotator: str, *, now_ms: int, lease_ms: int) -> bool:
        """Count a lease for ``annotator`` (True if it is new; give it back with
        :meth:`release` if no task came of it); RESOURCE_EXHAUSTED beyond the limit."""
        if caller.name is None or not self.limit:
            return False
        held = self._held.setdefault(caller.name, {})
        for name, until in list(held.items()):
            if until <= now_ms:
                del held[name]
        new = annotator not in held
        if new and len(held) >= self.limit:
            raise ResourceExhaustedError(
                f"the API key {caller.name!r} already holds task leases for {len(held)} "
                f"annotators, the most one key may (max_leases_per_principal); label or skip "
                "those tasks first"
            )
        held[annotator] = now_ms + lease_ms
        return new

    def release(self, caller: Caller, annotator: str) -> None:
        if caller.name is None:
            return
        held = self._held.get(caller.name)
        if held is not None:
            held.pop(annotator, None)
            if not held:
                del self._held[caller.name]
