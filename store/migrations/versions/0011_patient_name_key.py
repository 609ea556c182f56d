"""patients.name_key: the name as family^given in lower case, folded by Python, matched without regard to case

Names were matched through SQL's lower(), which folds only ASCII on SQLite (and on PostgreSQL under the C locale):
"Ó Súilleabháin^Siobhán", written exactly as stored, found nothing in C-FIND or QIDO-RS, nor did "Ó*". The key is
set on every write of a patient (store/models.py) and made here for the rows there are.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

BATCH = 2000


def upgrade() -> None:
    op.add_column('patients', sa.Column('name_key', sa.String(length=401), nullable=True))
    bind = op.get_bind()
    patients = sa.table('patients', sa.column('id', sa.Integer), sa.column('family_name', sa.String),
                        sa.column('given_names', sa.String), sa.column('name_key', sa.String))
    after = 0
    while True:
        rows = bind.execute(sa.select(patients.c.id, patients.c.family_name, patients.c.given_names)
                            .where(patients.c.id > after).order_by(patients.c.id).limit(BATCH)).all()
        if not rows:
            return
        # the same folding as store.models.name_key_of (not imported: a migration stays as it was written)
        bind.execute(sa.update(patients).where(patients.c.id == sa.bindparam('row_id')).values(name_key=sa.bindparam('key')),
                     [{'row_id': r.id, 'key': f"{r.family_name or ''}^{r.given_names or ''}".lower()} for r in rows])
        after = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table('patients') as batch:
        batch.drop_column('name_key')
