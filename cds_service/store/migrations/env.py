"""Alembic environment of the store (see cds_service/store/database.py).

`store.migrate()` passes its own connection, already inside the transaction that holds the
migration lock. Run from the `alembic` command line (e.g. to write a new revision:
`alembic -c cds_service/migrations/alembic.ini revision --autogenerate -m "..."`), the database is
CDS_DATABASE_URL's.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from cds_service.store.database import normalise_url
from cds_service.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=config.get_main_option("version_table") or "cds_alembic_version",
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_from_command_line() -> None:
    from sqlalchemy import create_engine

    from cds_service.settings import Settings

    engine = create_engine(normalise_url(Settings().database_url))
    with engine.begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against the database")
connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    _run_from_command_line()
