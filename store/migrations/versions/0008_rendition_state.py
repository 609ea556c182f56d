"""assets.rendition_state: renditions still to make (due) or that could not be made (failed)

Received DICOM objects are answered once stored; their pixels are decoded and the preview and
thumbnail made after the answer (gateway/core/ingest/deferred.py). NULL: made, as for every photo
stored before this revision.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN (no table rebuild on SQLite): every row stays as it is, NULL
    op.add_column('assets', sa.Column('rendition_state', sa.String(length=10), nullable=True))
    op.create_index('ix_assets_rendition_state', 'assets', ['rendition_state'])


def downgrade() -> None:
    with op.batch_alter_table('assets') as batch:
        batch.drop_index('ix_assets_rendition_state')
        batch.drop_column('rendition_state')
