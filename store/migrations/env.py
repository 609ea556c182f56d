from alembic import context

from store.models import Base

config = context.config
engine = config.attributes["engine"]

# Several processes may start on a fresh database at once: serialise the upgrade.
# PostgreSQL: a transaction-scoped advisory lock. SQLite: BEGIN IMMEDIATE (store.db).
_MIGRATION_LOCK = 0x636C696E6D696772  # "clinmigr"

with engine.connect().execution_options(clinphoto_write=True) as connection, connection.begin():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
