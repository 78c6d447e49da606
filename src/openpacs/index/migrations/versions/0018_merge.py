"""merge the QC edits (0014), IOCM (0015) and storage management (0016) branches into one head

Revision ID: 0018
Revises: 0014, 0015, 0016
"""

revision = '0018'
down_revision = ('0014', '0015', '0016')
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
