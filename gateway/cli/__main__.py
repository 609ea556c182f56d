"""`python -m gateway.cli`."""

import sys

from gateway.cli.main import app

sys.exit(app())
