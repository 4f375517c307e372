"""Per-key call rate (token bucket) and per-process calls in flight, both RESOURCE_EXHAUSTED; the
largest message each call may send (:data:`MessageLimits`)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from plaudit.services.common.errors import ResourceExhaustedError


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


MessageLimits = Mapping[str, int]
"""The largest request message each call may send, in bytes: ``/package.Service/Method`` for
gRPC (checked before the message is parsed), ``METHOD /route`` for HTTP bodies (checked before
the body is read). Each service derives its own from its settings."""

SMALL_MESSAGE_BYTES = 64 * 1024
"""The limit of a call with no texts in it (``GetStats``, ``ReloadModel``), and the slack every
other limit adds for its short fields (ids, numbers, options)."""

FIELD_OVERHEAD_BYTES = 16
"""Tag and length prefix of one length-delimited protobuf field, generously."""


def text_message_bytes(texts: int, text_bytes: int, extra: int = 0) -> int:
    """The largest protobuf message carrying ``texts`` texts of up to ``text_bytes`` UTF-8 bytes
    each, plus ``extra`` bytes of other fields, plus :data:`SMALL_MESSAGE_BYTES` of slack."""
    return texts * (text_bytes + FIELD_OVERHEAD_BYTES) + extra + SMALL_MESSAGE_BYTES
