"""Alembic environment of the metrics read models.

`metrics migrate` passes an open connection; run through Alembic's own
command line, the URL comes from the service's settings.
"""

from __future__ import annotations

from alembic import context

from metrics.settings import load_settings
from metrics.storage import VERSION_TABLE, create_engine
from metrics.tables import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=VERSION_TABLE,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = create_engine(load_settings())
    with engine.begin() as own_connection:
        context.configure(
            connection=own_connection,
            target_metadata=metadata,
            version_table=VERSION_TABLE,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
