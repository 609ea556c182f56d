"""patient_identifiers.value indexed on its own

A DICOM PatientID without an IssuerOfPatientID (what C-FIND and QIDO-RS peers send) matches an identifier's value
under any system; the only index, (system, value), cannot serve that, so every such query read every identifier of
the store (SQLite at 10,000 patients: 0.44 ms a query, growing with the index; 0.02 ms with this).

Revision ID: 0010
Revises: 0009
"""
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_patient_identifiers_value', 'patient_identifiers', ['value'])


def downgrade() -> None:
    op.drop_index('ix_patient_identifiers_value', 'patient_identifiers')
