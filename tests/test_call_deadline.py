"""The client-side deadline on each call of a PostgreSQL connection (`recsys/call_deadline.py`), on the
real server of this machine, through the gateway's own engine factory.

A frozen server (the case it exists for) is `tests/test_durability.py::test_a_hung_database_is_503_within_the_budget`;
here a live server is kept busy past the deadline instead (its statement timeout switched off for the session),
the liveness check that replaces SQLAlchemy's pre-ping is shown to replace a connection the server closed, and
a connection attempt to a listener that never answers gives up at the deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.exc import OperationalError

from recsys.call_deadline import _connect_within
from recsys.database import CALL_DEADLINE_FACTOR, create_database_engine
from serving.api.errors import is_database_unavailable

BUDGET_MS = 150
DEADLINE_S = CALL_DEADLINE_FACTOR * BUDGET_MS / 1000

on_postgresql = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_database_engine(database_url, timeout_ms=BUDGET_MS)
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT pg_backend_pid()")))


@on_postgresql
def test_a_statement_running_past_the_deadline_is_cut_and_the_pool_recovers(engine: Engine) -> None:
    started = time.monotonic()
    with pytest.raises(OperationalError) as raised, engine.connect() as connection:
        connection.execute(text("SET statement_timeout = 0"))  # the server would no longer cut it
        connection.execute(text("SELECT pg_sleep(5)"))
    elapsed = time.monotonic() - started
    assert raised.value.connection_invalidated and is_database_unavailable(raised.value)  # a 503 at the gateway
    assert DEADLINE_S <= elapsed < 5 / 2, f"cut after {elapsed:.2f} s, deadline {DEADLINE_S} s"
    assert backend_pid(engine) > 0  # the next checkout gets a fresh, working connection


@on_postgresql
def test_statements_each_inside_the_deadline_are_not_cut_whatever_their_sum(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SET statement_timeout = 0"))
        for _ in range(3):
            connection.execute(text("SELECT pg_sleep(:s)"), {"s": DEADLINE_S / 2})
        time.sleep(DEADLINE_S * 1.5)  # and a connection idle between statements is not cut either
        assert connection.scalar(text("SELECT 1")) == 1
        connection.commit()


@on_postgresql
def test_a_connection_returned_in_time_is_not_cut_later(engine: Engine) -> None:
    first = backend_pid(engine)
    time.sleep(DEADLINE_S * 1.5)  # idle in the pool past the deadline its checkout had
    assert backend_pid(engine) == first  # the same connection, still open


@on_postgresql
def test_a_connection_the_server_closed_while_pooled_is_replaced(engine: Engine, database_url: str) -> None:
    first = backend_pid(engine)
    admin = create_database_engine(database_url, timeout_ms=None)
    try:
        with admin.connect() as connection:
            assert connection.scalar(text(f"SELECT pg_terminate_backend({first})"))
    finally:
        admin.dispose()
    time.sleep(0.1)  # the backend exits
    assert backend_pid(engine) not in (0, first)  # the liveness check found it closed; the pool reconnected


@on_postgresql
def test_connecting_to_a_server_that_never_answers_gives_up_at_the_deadline(database_url: str) -> None:
    """A listener that takes the connection and never answers (a hung server's kernel does as much): psycopg's
    own connect timeout would wait 2 s, its minimum."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = make_url(database_url).set(host="127.0.0.1", port=silent.getsockname()[1])
        engine = create_database_engine(url, timeout_ms=BUDGET_MS)
        try:
            started = time.monotonic()
            with pytest.raises(OperationalError) as raised, engine.connect():
                pass
            elapsed = time.monotonic() - started
        finally:
            engine.dispose()
    assert is_database_unavailable(raised.value)  # a 503 at the gateway
    assert DEADLINE_S <= elapsed < DEADLINE_S + 0.5, f"gave up after {elapsed:.2f} s, deadline {DEADLINE_S} s"


def test_a_connection_opened_after_its_caller_gave_up_is_closed() -> None:
    """The attempt the caller stopped waiting for goes on; what it opens must not leak (a slow opener stands in
    for a connect that succeeds late, which a real server cannot be made to do on cue)."""
    release, closed = threading.Event(), threading.Event()

    class Opened:
        def close(self) -> None:
            closed.set()

    def open_late() -> Opened:
        release.wait(5)
        return Opened()

    with pytest.raises(TimeoutError, match="deadline"):
        _connect_within(open_late, 0.05, TimeoutError)
    release.set()
    assert closed.wait(5), "the late connection was not closed"


@on_postgresql
def test_a_connection_is_checked_when_reused_not_when_just_opened(engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pings: list[object] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(connection) or ping(connection))
    first = backend_pid(engine)
    assert pings == []  # a new connection: the round trip would tell nothing
    assert backend_pid(engine) == first
    assert len(pings) == 1  # the pooled one, reused: checked
