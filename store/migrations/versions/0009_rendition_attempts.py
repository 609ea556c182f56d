"""assets.rendition_tries and rendition_after: the renderer's attempts at a due photo, kept across restarts

A photo whose decode kills the process (a native decoder crash, the OOM killer) was taken up again first at every
start, the gateway crash-looping on it: each attempt is now counted in the row before the decode, and given up
(failed, audited) past a few. A fault of the host rather than the photo (the blob store or spool away) no longer
counts: the photo stays due and the renderer leaves it until rendition_after, taking the others meanwhile.

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs (no table rebuild on SQLite): every row stays as it is
    op.add_column('assets', sa.Column('rendition_tries', sa.Integer(), nullable=False, server_default='0'))
    op.add_column('assets', sa.Column('rendition_after', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('assets') as batch:
        batch.drop_column('rendition_after')
        batch.drop_column('rendition_tries')
