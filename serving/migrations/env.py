"""Alembic's entry point for the gateway's database: the ORM metadata, and the URL from our settings.

The URL comes from `config.attributes["database_url"]` (serving.api.migrate), else from `sqlalchemy.url`
in an ini file, else from `RECSYS_DATABASE_URL`. On SQLite, changes to existing tables run in batch
mode (copy and swap), since SQLite's ALTER TABLE cannot change columns or constraints.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from recsys.database import Base, create_database_engine, database_url

config = context.config
if config.config_file_name is not None:  # the `alembic` CLI with alembic.ini; not when called from Python
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from recsys.settings import get_settings

        url = get_settings().database_url
    return database_url(url).render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: write the SQL instead of running it."""
    url = _url()
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # No statement timeout: a migration may take longer than one request's budget.
    engine = create_database_engine(_url(), timeout_ms=None)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch mode copies a table and drops the old one; with foreign keys enforced, dropping
                # `customers` would cascade into `interactions`. (A no-op inside a transaction: before it.)
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            context.configure(connection=connection, target_metadata=Base.metadata,
                              render_as_batch=connection.dialect.name == "sqlite")  # fmt: skip
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
