"""Create and upgrade the gateway's database with its Alembic migrations (`serving/migrations/`).

    python -m serving.api.migrate upgrade            # to the newest revision (`make migrate`)
    python -m serving.api.migrate current            # the revision the database is at
    python -m serving.api.migrate downgrade base     # back to empty
    python -m serving.api.migrate upgrade --database-url postgresql://postgres@127.0.0.1/recsys

The database URL defaults to `RECSYS_DATABASE_URL` (recsys/settings.py). The application never migrates
on its own (several workers would race); it refuses to start on a database that is not at the newest
revision, naming this command. `alembic.ini` at the project root lets the `alembic` CLI work too
(`alembic revision --autogenerate -m ...` for a new revision, against an upgraded database).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class SchemaNotCurrentError(RuntimeError):
    """The database is not at the newest migration; the message says how to get it there."""


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic's configuration without an ini file; `serving/migrations/env.py` reads the URL from it."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url  # an attribute: URLs with '%' break ini interpolation
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def database_is_current(database_url: str) -> bool:
    """Whether the database answers and the migrations brought it to the newest revision."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from recsys.database import create_database_engine

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).exists()):
        return False  # asking would create an empty file
    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        return current_revisions(engine) == head_revisions()
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def ensure_schema_current(engine: Engine) -> None:
    """Refuse to serve a database that the migrations have not brought to the newest revision."""
    current, heads = current_revisions(engine), head_revisions()
    if current != heads:
        raise SchemaNotCurrentError(
            f"database {engine.url.render_as_string(hide_password=True)} is at revision "
            f"{', '.join(sorted(current)) or 'none (empty)'}, not {', '.join(sorted(heads))}: "
            "run `make migrate` (python -m serving.api.migrate upgrade)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.api.migrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("action", choices=["upgrade", "downgrade", "current"])
    parser.add_argument("revision", nargs="?", default=None, help="upgrade: default head; downgrade: required")
    parser.add_argument("--database-url", default=None, help="default: RECSYS_DATABASE_URL")
    args = parser.parse_args(argv)
    from recsys.settings import get_settings

    url = args.database_url or get_settings().database_url
    config = alembic_config(url)
    if args.action == "upgrade":
        command.upgrade(config, args.revision or "head")
    elif args.action == "downgrade":
        if not args.revision:
            parser.error("downgrade needs a revision (e.g. base, -1)")
        command.downgrade(config, args.revision)
    else:
        command.current(config, verbose=True)
        return 0
    from recsys.database import create_database_engine

    engine = create_database_engine(url, timeout_ms=None)
    try:
        revisions = ", ".join(sorted(current_revisions(engine))) or "none (empty)"
        print(f"{engine.url.render_as_string(hide_password=True)} is at revision {revisions}")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
