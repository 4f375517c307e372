"""HTTP beside gRPC, shared by every service that has an HTTP front end (aiohttp).

One of each, for all of them:

* :func:`error_response` / :func:`error_json`: the one place domain errors become HTTP. A
  :class:`~plaudit.services.common.errors.PlauditError` answers with its status from
  :data:`~plaudit.services.common.errors.HTTP_STATUS` and ``{"error": {"code", "field",
  "message"}}``; 429 and 503 carry ``Retry-After``.
* :func:`api_key_authenticator` / :func:`allow_all`: ``Authorization: Bearer <key>`` checked by
  the gRPC server's own :class:`~plaudit.services.common.security.guard.AccessGuard` (same keys,
  roles per ``METHOD /route``, same rate buckets), run by :func:`json_app` *before* the handler
  reads a byte of the body, so an unauthenticated caller costs a header lookup.
* :func:`read_json`: the body as JSON, or INVALID_ARGUMENT naming ``body``; a body over its
  route's limit (``body_limits`` of :func:`json_app`) is 413 naming ``body``, refused from its
  ``Content-Length`` before a byte is read (a chunked one as soon as it passes the limit); a body
  over :data:`INLINE_JSON_BYTES` is parsed in a worker thread, so the event loop (which serves
  gRPC too) keeps answering.
* :func:`message_from_json`: a JSON value read into a protobuf message through the proto JSON
  mapping, or INVALID_ARGUMENT naming the offending field (``items[0].completion``).
* :func:`json_app`: the application with that error mapping, the authenticator on protected
  paths, the server's in-flight limit on them (shared with gRPC: 429 when full), per-route body
  limits, security headers and request metrics; :class:`HttpServer` serves it.

Invariant: a handler never answers 500 for anything a client sent; an unexpected exception is
logged and answered with a JSON 500 that names no internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from plaudit.services.common.errors import HTTP_STATUS, InvalidArgumentError, PlauditError
from plaudit.services.common.security.guard import AccessGuard, CallRoles
from plaudit.services.common.security.keys import Principal
from plaudit.services.common.security.limits import InFlightLimit, MessageLimits

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Authenticator = Callable[[web.Request], Awaitable[None]]
PRINCIPAL = web.RequestKey("principal", Principal)
"""Who is calling, recorded by the authenticator for the handlers."""

BODY_LIMIT = web.RequestKey("body_limit", int)
"""The largest body the matched route takes, recorded by :func:`json_app` for :func:`read_json`."""

MAX_BODY_BYTES = 32 * 1024 * 1024
JSON_TEXT_FACTOR = 6
"""JSON bytes of one UTF-8 byte of a string at worst (a control character as ``\\u0001``): a
route's body limit is this times the text it carries."""
INLINE_JSON_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones in a worker thread."""
MAX_JSON_CONTAINERS = 1_000_000
"""JSON objects and arrays one body may hold. Parsing makes each a Python dict or list (``{}``,
3 bytes of JSON, becomes about 64 bytes), so this bounds what a body of empty containers can cost
(about 64 MB) far below what its size alone allows (about 700 MB for 32 MB of ``{},``); no
legitimate request comes near it (a maximal reward request holds a few thousand, an 8 MB task
import of tiny tasks about 500,000)."""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
"""A JSON string literal, or an unterminated one up to the end: every match attempt consumes to
the next closing quote or the end, so stripping strings is linear in the body, never a retry per
quote."""
M = TypeVar("M", bound=Message)

CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}
_RETRY_AFTER_S = {429: "1", 503: "2"}


# -- errors: the one place domain errors become HTTP ----------------------------------------------
def error_json(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    response = web.json_response(
        {"error": {"code": code, "field": field, "message": message}}, status=status
    )
    if status in _RETRY_AFTER_S:
        response.headers["Retry-After"] = _RETRY_AFTER_S[status]
    return response


def error_response(exc: PlauditError) -> web.Response:
    """The HTTP answer to a domain error: its status from
    :data:`~plaudit.services.common.errors.HTTP_STATUS`, JSON body."""
    field = exc.field if isinstance(exc, InvalidArgumentError) else None
    return error_json(HTTP_STATUS.get(exc.code, 500), exc.code.name, exc.message, field)


# -- authentication -------------------------------------------------------------------------------
async def allow_all(request: web.Request) -> None:
    """The authenticator of a service started with ``auth_disabled``: every request passes.

    An authenticator refuses by raising a :class:`PlauditError` whose code is
    ``UNAUTHENTICATED`` (401) or ``PERMISSION_DENIED`` (403), and may record who is calling in
    ``request[PRINCIPAL]`` for the handlers.
    """


def api_key_authenticator(guard: AccessGuard, route_roles: CallRoles) -> Authenticator:
    """Admit requests through ``guard`` (the gRPC server's keys and rate buckets), deciding the
    routes of ``route_roles`` (``"METHOD /route"`` -> roles): ``Authorization: Bearer <key>``,
    the role it names for the route, the key's rate limit. A path that matches no route only
    needs a valid key (then it is 404)."""
    guard = guard.for_calls(route_roles)

    async def authenticate(request: web.Request) -> None:
        authorization = request.headers.get("Authorization")
        resource = request.match_info.route.resource
        if resource is None:
            request[PRINCIPAL] = guard.identify(authorization)
            return
        method = "GET" if request.method == "HEAD" else request.method
        request[PRINCIPAL] = guard.check(f"{method} {resource.canonical}", authorization)

    return authenticate


def authenticator(guard: AccessGuard, route_roles: CallRoles) -> Authenticator:
    """The authenticator of a service's HTTP front end: :func:`api_key_authenticator` deciding
    ``route_roles`` when its guard requires keys, else :func:`allow_all`."""
    return api_key_authenticator(guard, route_roles) if guard.auth_required else allow_all


# -- JSON ------------------------------------------------------------------------------------------
async def read_json(request: web.Request) -> Any:
    """The request body as JSON; INVALID_ARGUMENT on ``body`` when it is not JSON (content type,
    UTF-8, syntax, nesting). A body over the route's limit (:data:`BODY_LIMIT`) is 413, from its
    ``Content-Length`` before anything is read; a large body is parsed off the event loop."""
    if request.content_type != "application/json":
        raise InvalidArgumentError("body", "must be JSON, sent as Content-Type: application/json")
    limit = request.get(BODY_LIMIT, MAX_BODY_BYTES)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    raw = bytearray()
    while chunk := await request.content.read(INLINE_JSON_BYTES):  # chunked: stop at the limit
        raw += chunk
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    if len(raw) <= INLINE_JSON_BYTES:
        return _parse_json(raw)
    return await asyncio.to_thread(_parse_json, raw)


def _same(value: dict[str, Any]) -> dict[str, Any]:
    return value


def json_containers(raw: bytes | bytearray) -> int:
    """The JSON objects and arrays in ``raw``, counted without parsing: brackets outside string
    literals (an over-count only for text that is not JSON, which the parse refuses anyway)."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_JSON_CONTAINERS:
        return raw.count(b"{") + raw.count(b"[")  # an upper bound is enough below the limit
    bare = _JSON_STRING.sub(b"", bytes(raw))
    return bare.count(b"{") + bare.count(b"[")


def _parse_json(raw: bytes | bytearray) -> Any:
    """``raw`` as JSON. The object hook is Python code, run per JSON object: the parse reaches
    the interpreter loop often, so a worker thread parsing a large body hands the GIL back to the
    event loop every switch interval instead of holding it for the whole parse. A body of more
    than :data:`MAX_JSON_CONTAINERS` objects and arrays is refused before it is parsed."""
    if json_containers(raw) > MAX_JSON_CONTAINERS:
        raise InvalidArgumentError(
            "body", f"holds more than {MAX_JSON_CONTAINERS} JSON objects and arrays"
        )
    try:
        text = raw.decode("utf-8")  # JSON is UTF-8 (RFC 8259), whatever charset is claimed
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError("body", f"is not valid UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text, object_hook=_same)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            "body", f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise InvalidArgumentError("body", "is nested too deeply") from exc


def _json_type(field: Any) -> str:
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return "a string"
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return "a boolean"
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        names = ", ".join(v.name for v in field.enum_type.values)
        return f"one of {names} (or its number)"
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return "an object"
    return "a number"


def _check_value(field: Any, value: object, where: str) -> None:
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_MESSAGE:
        if not field.message_type.full_name.startswith("google.protobuf."):
            _check_object(value, field.message_type, where)
        return
    if kind == FieldDescriptor.CPPTYPE_STRING:
        ok = isinstance(value, str)
    elif kind == FieldDescriptor.CPPTYPE_BOOL:
        ok = isinstance(value, bool)
    elif kind == FieldDescriptor.CPPTYPE_ENUM:
        ok = (isinstance(value, str) and value in field.enum_type.values_by_name) or (
            isinstance(value, int) and not isinstance(value, bool)
        )
    else:  # numbers; the JSON mapping also takes them as strings ("1.5", "NaN")
        ok = isinstance(value, int | float | str) and not isinstance(value, bool)
    if not ok:
        got = "null" if value is None else type(value).__name__
        raise InvalidArgumentError(where, f"must be {_json_type(field)}, got {got}")


def _check_object(value: object, descriptor: Any, prefix: str) -> None:
    if not isinstance(value, dict):
        raise InvalidArgumentError(prefix or "body", "must be a JSON object")
    by_json_name = {f.json_name: f for f in descriptor.fields}
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key) or by_json_name.get(key)
        where = f"{prefix}.{key}" if prefix else key
        if field is None:
            raise InvalidArgumentError(where, f"is not a field of {descriptor.name}")
        if item is None:  # null: the field's default
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # maps: checked by the parser below
        if field.is_repeated:
            if not isinstance(item, list):
                raise InvalidArgumentError(where, f"must be a list, got {type(item).__name__}")
            for i, element in enumerate(item):
                _check_value(field, element, f"{where}[{i}]")
        else:
            _check_value(field, item, where)


def message_from_json(body: object, message_cls: type[M]) -> M:
    """``body`` read into a ``message_cls`` through the proto JSON mapping (field names as in the
    proto or in lowerCamelCase, enums by name or number, null for a default); INVALID_ARGUMENT
    naming the first unknown or mistyped field (``items[0].completion``), ``body`` when the body
    is not an object."""
    _check_object(body, message_cls.DESCRIPTOR, "")
    assert isinstance(body, dict)
    message = message_cls()
    try:
        json_format.ParseDict(body, message)
    except (json_format.ParseError, OverflowError, TypeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0].rstrip(".")
        name = message_cls.DESCRIPTOR.name
        raise InvalidArgumentError("body", f"is not a {name} ({detail})") from None
    return message


# -- the application ------------------------------------------------------------------------------
def json_app(
    routes: Iterable[web.AbstractRouteDef],
    *,
    requests: Counter,
    duration: Histogram,
    authenticate: Authenticator,
    protected: Callable[[str], bool],
    public_headers: dict[str, str] | None = None,
    static: tuple[str, Path] | None = None,
    client_max_size: int = MAX_BODY_BYTES,
    body_limits: MessageLimits | None = None,
    in_flight: InFlightLimit | None = None,
) -> web.Application:
    """An aiohttp application: ``routes``; ``authenticate`` before every handler whose path is
    ``protected``, then a slot of ``in_flight`` (the gRPC server's own: 429 when full);
    errors as JSON on protected paths (see :func:`error_response`); request
    counts (``requests``, labels route and status) and latencies (``duration``, label route);
    ``nosniff`` and ``no-referrer`` everywhere, ``no-store`` on protected paths and
    ``public_headers`` (e.g. a CSP for a page) on the others; ``static`` serves a folder.
    A route's body is limited by ``body_limits`` (``"METHOD /route"`` -> bytes), a route it does
    not name by ``client_max_size``."""
    limits: Mapping[str, int] = body_limits or {}
    slots = in_flight or InFlightLimit(0)

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await _guarded(request, handler)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            requests.labels(route, str(status)).inc()
            duration.labels(route).observe(time.perf_counter() - started)

    async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        api_call = protected(request.path)
        resource = request.match_info.route.resource
        if resource is not None:
            call = f"{request.method} {resource.canonical}"
            request[BODY_LIMIT] = limits.get(call, client_max_size)
        try:
            if not api_call:
                return await handler(request)
            await authenticate(request)
            with slots.slot():
                return await handler(request)
        except PlauditError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if not api_call or exc.status < 400:
                raise
            code = CODE_OF_HTTP.get(exc.status, "UNKNOWN")
            if exc.status == 413:
                return error_json(413, code, f"body: {exc.text}", "body")
            return error_json(exc.status, code, exc.reason)
        except Exception:
            log.exception("http handler failed", extra={"path": request.path})
            return error_json(500, "INTERNAL", "internal error; see the service log")

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if protected(request.path):
            response.headers.setdefault("Cache-Control", "no-store")
        else:
            for name, value in (public_headers or {}).items():
                response.headers.setdefault(name, value)

    app = web.Application(
        middlewares=[handle], client_max_size=max([client_max_size, *limits.values()])
    )
    app.add_routes(routes)
    if static is not None:
        app.router.add_static(static[0], static[1], follow_symlinks=False)
    app.on_response_prepare.append(headers)
    return app


class HttpServer:
    """Serves an application on ``host:port`` (0 picks a free port) on the running loop, over
    TLS when given an ``ssl_context``; ``port`` is the bound one after :meth:`start`."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        grace_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app = app
        self._ssl_context = ssl_context
        self._host = host
        self._requested_port = port
        self._grace_s = grace_s
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=self._grace_s
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("http server started", extra={"port": self.port})

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests up to ``grace_s`` seconds, close."""
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        log.info("http server stopped", extra={"port": self.port})
