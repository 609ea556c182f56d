"""hl7_messages.duplicate_of: a different message sent under a used control id is kept beside the first

The sender/control-id key stays unique among the messages that own their key (duplicate_of IS NULL);
a message refused for reusing a key points at the message that owns it.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hl7_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('duplicate_of', sa.Integer(), nullable=True))
        batch_op.drop_constraint('uq_hl7_sender_control', type_='unique')
    op.create_index('uq_hl7_sender_control', 'hl7_messages', ['sending_application', 'sending_facility', 'control_id'],
                    unique=True, sqlite_where=sa.text('duplicate_of IS NULL'),
                    postgresql_where=sa.text('duplicate_of IS NULL'))


def downgrade() -> None:
    op.drop_index('uq_hl7_sender_control', table_name='hl7_messages')
    op.execute("DELETE FROM hl7_messages WHERE duplicate_of IS NOT NULL")
    with op.batch_alter_table('hl7_messages', schema=None) as batch_op:
        batch_op.drop_column('duplicate_of')
        batch_op.create_unique_constraint('uq_hl7_sender_control', ['sending_application', 'sending_facility', 'control_id'])
