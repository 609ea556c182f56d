"""patients.public_id: a stable opaque id for the doors (REST, FHIR Patient.id), never the row id

Made by the database on insert (so the ADT hot path's plain INSERT needs no change): 32 hex digits
of a random UUID. Existing rows get one each.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

SQLITE_DEFAULT = sa.text("(lower(hex(randomblob(16))))")
POSTGRES_DEFAULT = sa.text("replace(gen_random_uuid()::text, '-', '')")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # a volatile default is evaluated per existing row: every patient gets its own
        op.add_column('patients', sa.Column('public_id', sa.String(32), nullable=False, server_default=POSTGRES_DEFAULT))
    else:
        # SQLite cannot ADD COLUMN with a non-constant default: batch mode copies the table, the default fills each row
        with op.batch_alter_table('patients', schema=None) as batch_op:
            batch_op.add_column(sa.Column('public_id', sa.String(32), nullable=False, server_default=SQLITE_DEFAULT))
    op.create_index('uq_patients_public_id', 'patients', ['public_id'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_patients_public_id', table_name='patients')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_column('public_id')
