from alembic import context

from store.models import Base

config = context.config
engine = config.attributes["engine"]

# Several processes may start on a fresh database at once: serialise the upgrade.
# PostgreSQL: a transaction-scoped advisory lock. SQLite: BEGIN IMMEDIATE (store.db).
_MIGRATION_LOCK = 0x636C696E6D696772  # "clinmigr"


class ForeignKeysBroken(RuntimeError):
    pass


with engine.connect().execution_options(clinphoto_write=True) as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table (copy, drop, rename): with foreign keys enforced, dropping a table other
        # tables refer to (patients) fails on a store holding data. SQLite only changes this outside a
        # transaction, so it is set on the driver connection before BEGIN, checked and set back after.
        connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                # SQLite cannot ALTER most things in place; batch mode copies the table.
                render_as_batch=sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:  # roll the migration back rather than leave dangling references
                    raise ForeignKeysBroken(f"a migration left {len(broken)} row(s) with dangling references, e.g. {broken[0]}")
    finally:
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
