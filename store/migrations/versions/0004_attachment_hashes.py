"""assets.sha1, preview_sha1, preview_size: what a FHIR Attachment states about the bytes at its url

Attachment.hash is the base64 SHA-1 of the data. Worked out once at ingest (the original and the preview a caller
is given), never per search. Photos stored before this revision have none until they are stored again; their
attachments leave hash (and the preview's size) out, which FHIR allows.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('assets', sa.Column('sha1', sa.String(length=28), nullable=True))
    op.add_column('assets', sa.Column('preview_sha1', sa.String(length=28), nullable=True))
    op.add_column('assets', sa.Column('preview_size', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('assets', schema=None) as batch_op:
        batch_op.drop_column('preview_size')
        batch_op.drop_column('preview_sha1')
        batch_op.drop_column('sha1')
