"""Alembic's entry point for the progression service's migrations.

`progression.db.migrate` runs these with a connection it has opened (passed
in `config.attributes["connection"]`), inside its own transaction. Run
without one, a `sqlalchemy.url` option is needed: online it opens its own
engine through `progression.db.create_engine`, offline it prints the SQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from progression.db import comparison_options, create_engine
from progression.tables import metadata

config = context.config


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        **comparison_options(_dialect_name(config.get_main_option("sqlalchemy.url"))),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            **comparison_options(connection.dialect.name),
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured")
    engine = create_engine(url)
    try:
        with engine.connect() as own_connection:
            context.configure(
                connection=own_connection,
                target_metadata=metadata,
                **comparison_options(own_connection.dialect.name),
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def _dialect_name(url: str | None) -> str:
    return sa.make_url(url).get_backend_name() if url else ""


if context.is_offline_mode():
    run_offline()
else:
    run_online()
