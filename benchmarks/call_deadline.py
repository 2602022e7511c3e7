"""What the client-side call deadline costs: the gateway's PostgreSQL engine against a plain pre-ping engine.

    .venv/bin/python benchmarks/call_deadline.py [--url postgresql://postgres@127.0.0.1:5432/postgres] [--rounds 3]

In a throw-away database (created and dropped here), both engines do the same `--calls` times: check a
connection out (a liveness check), run `SELECT 1`, give it back (a rollback). The reference is SQLAlchemy's
own `pool_pre_ping` engine with the same statement timeout; the measured one is `create_database_engine`, whose
liveness check, statement and rollback each arm and disarm a deadline (`recsys/call_deadline.py`).
Then the same with a new connection each time (`--new-connections` times, engines without a pool), where
the call deadline also hands the connection attempt to a worker thread. Rounds alternate between the
engines; prints microseconds per call and the ratio per round.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))


def microseconds_per_call(engine, calls: int) -> float:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    started = time.perf_counter()
    for _ in range(calls):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="a server to test on")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--new-connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-ms", type=int, default=200)
    args = parser.parse_args()

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from recsys.call_deadline import add_call_deadline
    from recsys.database import CALL_DEADLINE_FACTOR, create_database_engine, database_url

    admin_url = database_url(args.url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"recsys_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    url = admin_url.set(database=name)
    options = {"options": f"-c statement_timeout={args.budget_ms}"}
    unpooled_with_deadline = create_engine(url, poolclass=NullPool, connect_args=options)
    add_call_deadline(unpooled_with_deadline, CALL_DEADLINE_FACTOR * args.budget_ms / 1000)
    measurements = {
        "pooled": (args.calls, {
            "pre-ping engine (reference)": create_engine(url, pool_pre_ping=True, connect_args=options),
            "gateway engine with call deadline": create_database_engine(url, timeout_ms=args.budget_ms),
        }),
        "new connection": (args.new_connections, {
            "pre-ping engine (reference)": create_engine(url, poolclass=NullPool, pool_pre_ping=True,
                                                         connect_args=options),
            "engine with call deadline": unpooled_with_deadline,
        }),
    }  # fmt: skip
    try:
        for _, engines in measurements.values():
            for engine in engines.values():
                microseconds_per_call(engine, 100)  # connect and warm up
        for kind, (calls, engines) in measurements.items():
            for round_number in range(1, args.rounds + 1):
                measured = {label: microseconds_per_call(engine, calls) for label, engine in engines.items()}
                reference, deadline = measured.values()
                cells = ", ".join(f"{label} {value:.0f} us" for label, value in measured.items())
                print(f"{kind}, round {round_number}: {cells}; ratio {deadline / reference:.2f}")
    finally:
        for _, engines in measurements.values():
            for engine in engines.values():
                engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
