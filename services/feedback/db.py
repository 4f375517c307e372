"""Database plumbing of the feedback store: URLs, engines, transactions, error translation.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` (a commit is on disk
before it is acknowledged) and a busy timeout; write transactions start with ``BEGIN IMMEDIATE``
so two writers never deadlock upgrading a read lock. PostgreSQL goes through psycopg 3.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from plaudit.services.common.errors import PlauditError, UnavailableError

log = logging.getLogger(__name__)

DEFAULT_FEEDBACK_URL = "sqlite:///.plaudit/feedback.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 2
POSTGRES_TCP_USER_TIMEOUT_MS = 10_000  # unacknowledged data on a dead link: give up then
WRITE_ATTEMPTS = 3  # a unique-key race with a writer that bypassed the lock is retried
_SQLITE_BEGIN = "plaudit_sqlite_begin"  # execution option: "DEFERRED" (default) or "IMMEDIATE"


def json_dumps(value: Any) -> str:
    """JSON for the payload/metadata columns (orjson: several times faster on long texts)."""
    return orjson.dumps(value).decode()


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://`` (or ``postgres://``) gets psycopg 3."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"not a database URL: {url!r}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: use "
        "sqlite:///path/to/feedback.db or postgresql://user@host/db (psycopg 3)"
    )


def is_sqlite(engine_or_conn: Engine | Connection) -> bool:
    return engine_or_conn.dialect.name == "sqlite"


def create_feedback_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    connect_timeout_s: int = POSTGRES_CONNECT_TIMEOUT_S,
    read_only: bool = False,
) -> Engine:
    """An engine for ``url`` with the SQLite pragmas / PostgreSQL options described above.

    ``read_only`` engines cannot write: SQLite connections are ``query_only`` (and leave the
    journal mode and folders alone), PostgreSQL transactions are ``READ ONLY``.

    PostgreSQL connections give up after ``connect_timeout_s`` and detect a dead link (TCP
    keepalives, ``tcp_user_timeout``), so an outage fails calls fast instead of hanging them;
    a pooled connection is pinged before use and replaced when the database is back.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, read_only)
    engine = sa.create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        pool_pre_ping=True,
        pool_timeout=max(5, 2 * connect_timeout_s),  # waiting for a free pooled connection
        isolation_level="READ COMMITTED",  # writers rely on a fresh snapshot per statement
        connect_args={
            "connect_timeout": connect_timeout_s,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
            "tcp_user_timeout": POSTGRES_TCP_USER_TIMEOUT_MS,
        },
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
    )
    if read_only:

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.read_only = True  # psycopg 3: every transaction is READ ONLY

    return engine


def _sqlite_engine(url: URL, read_only: bool) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(url) or ":memory:" in database:
        raise ValueError(
            "in-memory SQLite is not supported (one database per connection); "
            "use a file, e.g. sqlite:///.plaudit/feedback.db"
        )
    if read_only and not url.query.get("uri") and not Path(database).is_file():
        raise UnavailableError(  # SQLite would create an empty file: a reader never writes
            f"no feedback database at {database}: start `plaudit serve feedback` on it, or "
            "`plaudit feedback import` some feedback first"
        )
    if not url.query.get("uri") and not read_only:
        folder = Path(database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UnavailableError(f"cannot create the feedback database folder: {exc}") from exc
    engine = sa.create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if read_only:
                cursor.execute("PRAGMA query_only=ON")
            else:
                _enable_wal(cursor)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch the database to WAL (a persistent setting). The switch ignores the busy timeout,
    so connections racing to create a new database retry it until the timeout passes."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            mode = str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            mode = "locked"
        if mode.lower() == "wal":
            return
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode {mode})")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that commits on success (``BEGIN IMMEDIATE`` on SQLite)."""
    with engine.connect() as conn:
        if is_sqlite(conn):
            conn = conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn


T = TypeVar("T")


def write_with_retry(
    engine: Engine,
    lock: AbstractContextManager[Any],
    action: str,
    work: Callable[[Connection], T],
) -> T:
    """``work`` in one write transaction under ``lock``; an ``IntegrityError`` (a unique-key race
    with another writer) is retried up to :data:`WRITE_ATTEMPTS` times. Database failures are
    raised as :class:`UnavailableError` (see :func:`database_errors`)."""
    with database_errors(action):
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with lock, write_transaction(engine) as conn:
                    return work(conn)
            except sa.exc.IntegrityError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning(
                    "feedback write raced with another writer; retrying",
                    extra={"action": action, "attempt": attempt, "reason": str(exc.orig)[:200]},
                )
    raise AssertionError("unreachable")  # pragma: no cover


def describe_database_error(exc: BaseException) -> str:
    """The first line of the driver's message, without SQL or parameters."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()
    return (text[0] if text else type(original).__name__)[:300]


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Turn any database failure into :class:`UnavailableError`, logged once with its cause.

    The driver's text stays in the server log: it can name database hosts, users, ports or
    tables, so the error a caller sees says only what was being done (issue 17 item 8)."""
    try:
        yield
    except PlauditError:
        raise
    except sa.exc.SQLAlchemyError as exc:
        reason = describe_database_error(exc)
        log.error(
            "feedback database error", extra={"action": action, "reason": reason}, exc_info=exc
        )
        raise UnavailableError(
            f"feedback database unavailable while {action}; retry later"
        ) from exc
