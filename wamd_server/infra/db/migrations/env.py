"""Alembic environment. wamd runs migrations in-process (see `wamd_server.infra.db.migrate`), passing a
connection in `config.attributes["connection"]`; `render_as_batch` keeps ALTERs working on SQLite."""

from alembic import context

from wamd_server.infra.db.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `wamd-server migrate`, which supplies the database connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
