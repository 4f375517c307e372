"""Who labels: the annotator of a call is bound to the API key that made it.

With authentication on, every key is the annotator of its own name: the ``annotator_id`` of a
submission, a task lease or a skip must be empty (it becomes the key's name) or that name, else
PERMISSION_DENIED naming ``annotator_id``. Only the keys named in the feedback service's
``any_annotator_keys`` setting may act for any annotator (batch imports, a front end that
authenticates its own users). Every key is held to ``max_leases_per_principal`` annotators with a
live task lease; the leases are counted in the database when one is granted
(:meth:`~plaudit.services.feedback.task_store.TaskStore.claim`), so the limit holds across all
the processes that share it.
Idempotency keys are scoped to the caller: what is stored is ``<key name>/<idempotency_key>``
(see :func:`scoped_key`), so one key can neither find nor pre-empt another key's submission.

With authentication off (``auth_disabled``) the caller is anonymous and nothing here applies:
``annotator_id`` is whatever the client says, as before.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, replace

from plaudit.services.common.errors import PermissionDeniedError
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
