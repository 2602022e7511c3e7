"""A client-side deadline on every call a PostgreSQL connection makes to the server.

`statement_timeout` and `lock_timeout` are enforced by the server, so a server that stops answering without
closing anything (a storage stall, a frozen VM, every backend SIGSTOPped, a network path that drops packets
without a reset) never enforces them: the kernel keeps acknowledging, and the request thread waits in
psycopg's read forever. TCP keepalives and `tcp_user_timeout` do not fire either, as the peer's kernel answers.

So each call (a statement, a commit or rollback, the liveness check at checkout, the rollback when the pool
takes a connection back) arms a deadline for its connection, and the end of the call disarms it; one watchdog
thread (per process, shared by all engines) shuts down the socket of a connection still armed past its
deadline. The blocked call then fails at once as a lost connection, which SQLAlchemy invalidates (the pool
opens a fresh one later) and the gateway's error handler answers with 503 and `Retry-After`
(`serving/api/errors.py`). Per call rather than per checkout: a request's few statements may each take up to
the server's own timeout, and a startup check reflects many.

SQLAlchemy has no event after a commit or rollback: that deadline stays armed until the next statement or the
connection's return to the pool, which a session does right after committing.

Cost: a checkout with one statement and the rollback on return took 1.15-1.8 times as long as with
SQLAlchemy's plain pre-ping engine across runs (+0.1-0.23 ms, mostly SQLAlchemy's event dispatch;
`benchmarks/call_deadline.py`, 2026-11-26). Wrapping the dialect's `do_execute`/`do_commit`/`do_rollback`/
`do_ping` instead of listening to events would be cheaper, and would disarm right after a commit.

The liveness check SQLAlchemy's `pool_pre_ping` would run before a checkout is run here instead, inside a
deadline (the pre-ping runs before any pool event, where none can be armed).

Opening a new connection has the same deadline, which psycopg's own connect timeout cannot give (whole
seconds, at least 2 s, as libpq's): and a hung server is exactly when the pool opens new ones, since every
connection it cut was invalidated. The attempt runs in a worker thread and the caller waits the deadline for
it; one still running then is left to finish under psycopg's timeout and its connection, if any, is closed.
The hand-over costs 0.8-0.9 ms on a new connection (1.19-1.23x a pre-ping engine's 4.1-4.4 ms with a first
statement, to this machine's PostgreSQL; the same benchmark), and nothing on a pooled one. A connection just
opened is not pinged at its first checkout, as `pool_pre_ping` does not ping it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from sqlalchemy import Connection, Engine, event, exc
from sqlalchemy.engine import ExceptionContext


class _Watchdog:
    """Deadlines by connection; a daemon thread that looks every `TICK_S` while any is armed (and sleeps while
    none is) and cuts what outlived its deadline. Arming and disarming cost a dict operation under a lock."""

    TICK_S = 0.02  # a call is cut between its deadline and a tick later

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._deadlines: dict[int, tuple[float, int]] = {}  # id(connection) -> (deadline, socket fd)
        self._cut: set[int] = set()  # connections whose socket this watchdog shut down, until disarmed
        self._thread: threading.Thread | None = None

    def arm(self, connection: Any, seconds: float) -> None:
        try:
            fd = connection.fileno()
        except Exception:  # closed or lost already (psycopg raises its own error): nothing left to cut
            return
        deadline = time.monotonic() + seconds
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="db-call-deadline", daemon=True)
                self._thread.start()
            if not self._deadlines:
                self._changed.notify()  # the watchdog sleeps while nothing is armed
            self._deadlines[id(connection)] = (deadline, fd)
            self._cut.discard(id(connection))

    def disarm(self, connection: Any) -> None:
        """Called before the connection is returned, invalidated or closed, so its descriptor, which the
        process may reuse for another socket once closed, is never shut down afterwards."""
        with self._changed:
            self._deadlines.pop(id(connection), None)
            self._cut.discard(id(connection))

    def was_cut(self, connection: Any) -> bool:
        with self._changed:
            return id(connection) in self._cut

    def _watch(self) -> None:
        with self._changed:
            while True:
                self._changed.wait(self.TICK_S if self._deadlines else None)
                now = time.monotonic()
                for key, (deadline, fd) in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[key]
                        self._cut.add(key)
                        _shut_down(fd)


def _shut_down(fd: int) -> None:
    """Shut the socket down (both directions) without closing the descriptor, which psycopg still owns:
    the thread blocked on it wakes up to an end of stream. `fromfd` works on a duplicate descriptor;
    shutdown acts on the socket they share."""
    with contextlib.suppress(OSError), socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()
_FRESH = "recsys_call_deadline_fresh"  # in a connection record's info until its first checkout

# Connection attempts in flight at once, per process: with a hung server each lasts psycopg's connect timeout,
# and further attempts wait in the queue, each taken out again when its caller's deadline passes.
CONNECT_WORKERS = 8
_CONNECTOR = ThreadPoolExecutor(max_workers=CONNECT_WORKERS, thread_name_prefix="db-connect")


def _connect_within(open_connection: Callable[[], Any], seconds: float, error: type[Exception]) -> Any:
    """The connection `open_connection` returns, or `error` once `seconds` have passed without one."""
    attempt = _CONNECTOR.submit(open_connection)
    try:
        return attempt.result(timeout=seconds)
    except FutureTimeoutError:
        if not attempt.cancel():  # running: close what it opens, should it still succeed
            attempt.add_done_callback(_close_if_opened)
        raise error(f"connecting to the database took longer than the {seconds:g} s deadline") from None


def _close_if_opened(attempt: Future[Any]) -> None:
    if attempt.exception() is None:
        with contextlib.suppress(Exception):
            attempt.result().close()


def add_call_deadline(engine: Engine, seconds: float) -> None:
    """Give every call of `engine`'s connections to the server `seconds` to come back (the engine must be
    created without `pool_pre_ping`: the liveness check is done here, inside a deadline)."""
    dialect = engine.dialect

    @event.listens_for(engine, "do_connect")
    def _connect_within_the_deadline(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        return _connect_within(lambda: dialect.connect(*cargs, **cparams), seconds,
                               dialect.loaded_dbapi.OperationalError)  # fmt: skip

    def arm(connection: Connection) -> None:
        if not connection.invalidated:  # .connection of an invalidated one would try to reconnect
            _WATCHDOG.arm(connection.connection.dbapi_connection, seconds)

    def disarm(connection: Connection) -> None:
        if not connection.invalidated:  # invalidated: disarmed by the pool's event then
            _WATCHDOG.disarm(connection.connection.dbapi_connection)

    # Pool events get the DBAPI connection itself.
    @event.listens_for(engine, "connect")
    def _note_a_fresh_connection(connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine, "checkout")
    def _ping(connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_FRESH, False):
            return  # just opened: nothing to check (as pool_pre_ping skips it)
        _WATCHDOG.arm(connection, seconds)
        try:
            dialect.do_ping(connection)
        except dialect.loaded_dbapi.Error as error:
            if _WATCHDOG.was_cut(connection) or not dialect.is_disconnect(error, connection, None):
                raise  # the budget is spent (or not a lost connection): no second try on a fresh connection
            # A connection the server closed while pooled: the pool replaces it and checks out again.
            raise exc.DisconnectionError(str(error)) from error
        _WATCHDOG.disarm(connection)

    @event.listens_for(engine, "reset")
    def _arm_for_the_reset(connection: Any, record: Any, state: Any) -> None:
        if connection is not None:
            _WATCHDOG.arm(connection, seconds)  # the rollback on return; checkin follows it

    @event.listens_for(engine, "checkin")
    def _disarm_on_checkin(connection: Any, record: Any) -> None:
        if connection is not None:  # None: it was invalidated while checked out, and disarmed then
            _WATCHDOG.disarm(connection)

    @event.listens_for(engine, "invalidate")
    def _disarm_on_invalidate(connection: Any, record: Any, error: BaseException | None) -> None:
        _WATCHDOG.disarm(connection)

    @event.listens_for(engine, "close")
    def _disarm_on_close(connection: Any, record: Any) -> None:
        _WATCHDOG.disarm(connection)

    # Connection events get SQLAlchemy's Connection.
    @event.listens_for(engine, "before_cursor_execute")
    def _arm_for_the_statement(connection: Connection, *args: Any) -> None:
        arm(connection)

    @event.listens_for(engine, "after_cursor_execute")
    def _disarm_after_the_statement(connection: Connection, *args: Any) -> None:
        disarm(connection)

    @event.listens_for(engine, "handle_error")
    def _disarm_after_an_error(context: ExceptionContext) -> None:
        if context.connection is not None:
            disarm(context.connection)

    @event.listens_for(engine, "commit")
    def _arm_for_the_commit(connection: Connection) -> None:
        arm(connection)

    @event.listens_for(engine, "rollback")
    def _arm_for_the_rollback(connection: Connection) -> None:
        arm(connection)
