"""Alembic environment. wamd runs migrations in-process (see `wamd_server.infra.db.migrate`), passing a
connection in `config.attributes["connection"]`; `render_as_batch` keeps ALTERs working on SQLite.

On SQLite the connection enforces foreign keys, and a batch operation that has to recreate a table drops the old
one: the rows of tables referencing it `ON DELETE CASCADE` would go too (recreating `outbox` would empty
`outbox_due`, and nothing would be sent). A migration that recreates such a table must turn foreign keys off
first (outside the transaction) or save and restore those rows."""

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
