"""outbox.commitment_uid, committed_at: Storage Commitment (push model) for routing destinations that confirm

An item sent to such a destination is "delivered" after C-STORE success and "committed" when the destination's
N-EVENT-REPORT names it under the Transaction UID its N-ACTION asked with.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('commitment_uid', sa.String(length=64), nullable=True))
    op.add_column('outbox', sa.Column('committed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_outbox_commitment', 'outbox', ['commitment_uid'])


def downgrade() -> None:
    op.drop_index('ix_outbox_commitment', table_name='outbox')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('committed_at')
        batch_op.drop_column('commitment_uid')
