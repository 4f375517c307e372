"""Per-key call rate (token bucket) and per-process calls in flight, both RESOURCE_EXHAUSTED; the
largest message each call may send (:data:`MessageLimits`) and the most fields it may hold
(:data:`FieldLimits`, counted on the wire by :func:`count_fields`)."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

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


FieldLimits = Mapping[str, int]
"""The most protobuf fields one request of each gRPC call (``/package.Service/Method``) may
hold, counted on the wire before the message is parsed (:func:`count_fields`). Each service
derives its own from its settings (:func:`field_limit`)."""

SMALL_FIELD_COUNT = 64
"""The field limit of a call with no repeated field (``GetStats``, ``ReloadModel``), and the slack
every other limit adds for its scalar fields."""


def field_limit(fields: int) -> int:
    """The field limit of a call whose largest legitimate request holds ``fields`` fields: twice
    that (a request a little over the service's own limits still reaches the servicer, whose
    error names the field), plus :data:`SMALL_FIELD_COUNT`. Parsed, a field costs at most a few
    hundred bytes beyond its text, so requests within the limit cost about what their bytes do."""
    return 2 * fields + SMALL_FIELD_COUNT


class _Layout:
    """What :func:`count_fields` needs of one message type: the message type of each
    length-delimited field that is a message, and which fields are packed scalars."""

    def __init__(self, descriptor: Descriptor) -> None:
        self.messages: dict[int, Descriptor] = {}
        self.packed: set[int] = set()
        for f in descriptor.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
                self.messages[f.number] = f.message_type
            elif f.is_repeated and f.type not in (
                FieldDescriptor.TYPE_STRING,
                FieldDescriptor.TYPE_BYTES,
                FieldDescriptor.TYPE_GROUP,
            ):
                self.packed.add(f.number)


@functools.cache
def _layout(descriptor: Descriptor) -> _Layout:
    return _Layout(descriptor)


class _Truncated(Exception):
    """The wire data ends inside a field (the parser will refuse it)."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Truncated


def count_fields(data: bytes, descriptor: Any, limit: int) -> int:
    """The fields of the wire-format message ``data`` of type ``descriptor`` (a message
    ``Descriptor``, pure-Python or upb): every tag at every
    depth (the fields of nested messages of known fields are counted too; each element of a
    packed repeated scalar counts as a field). Counting stops past ``limit``, so the cost is at
    most about ``limit`` steps whatever ``data`` holds. Malformed data is counted as far as it
    goes; the parser that follows refuses it.

    Parsing expands a message of many small fields (an empty repeated message is 2 bytes on the
    wire and about 50 once parsed): counting first bounds what a request can cost in memory by
    its field count as well as by its bytes."""
    count = 0
    pos = 0
    stack = [(len(data), _layout(descriptor))]  # (end, layout) of the messages we are inside
    try:
        while stack:
            end, layout = stack[-1]
            if pos >= end:
                stack.pop()
                continue
            key, pos = _varint(data, pos, end)
            count += 1
            if count > limit:
                return count
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos, end)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise _Truncated
                inner = layout.messages.get(number)
                if inner is not None:
                    stack.append((pos + length, _layout(inner)))
                    continue
                if number in layout.packed:
                    count += length  # at most one element per byte
                    if count > limit:
                        return count
                pos += length
            elif wire not in (3, 4):  # 3, 4: a group's start and end, counted like fields
                raise _Truncated  # wire types 6 and 7 do not exist
            if pos > end:
                raise _Truncated
    except _Truncated:
        pass
    return count
