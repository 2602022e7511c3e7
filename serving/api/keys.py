"""Manage the gateway's API keys (serving/api/auth.py) in its database.

    python -m serving.api.keys create web-tier --scopes read           # prints the key once: keep it
    python -m serving.api.keys create tracker --scopes ingest
    python -m serving.api.keys create ops --scopes admin read ingest
    python -m serving.api.keys list
    python -m serving.api.keys revoke web-tier                          # refused within seconds

The database URL defaults to `RECSYS_DATABASE_URL`; the database must be migrated (`make migrate`).
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recsys.database import ApiKey, create_database_engine
from serving.api.auth import Scope, create_api_key, revoke_api_key
from serving.api.migrate import ensure_schema_current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.api.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--database-url", default=None, help="default: RECSYS_DATABASE_URL")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (the only time it is shown)")
    create.add_argument("name", help="who the key is for, unique, e.g. web-tier")
    create.add_argument("--scopes", nargs="+", required=True, choices=[scope.value for scope in Scope])
    actions.add_parser("list", help="the keys: name, prefix, scopes, created, revoked")
    revoke = actions.add_parser("revoke", help="revoke the key of that name")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    from recsys.settings import get_settings

    engine = create_database_engine(args.database_url or get_settings().database_url, timeout_ms=None)
    try:
        ensure_schema_current(engine)
        with Session(engine) as session:
            if args.action == "create":
                try:
                    print(create_api_key(session, args.name, args.scopes))
                except IntegrityError:
                    print(f"error: a key named {args.name!r} exists (revoked keys keep their name)", file=sys.stderr)
                    return 1
            elif args.action == "revoke":
                if not revoke_api_key(session, args.name):
                    print(f"error: no live key named {args.name!r}", file=sys.stderr)
                    return 1
                print(f"revoked {args.name}")
            else:
                for key in session.scalars(select(ApiKey).order_by(ApiKey.id)):
                    revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
                    created = f"created {key.created_at:%Y-%m-%d %H:%M}"
                    print(f"{key.name}\t{key.prefix}…\t{key.scopes}\t{created}\t{revoked}")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
