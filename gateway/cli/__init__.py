"""`clinphoto` command line (wiring: imports everything, imported by nothing but the entry point)."""

from gateway.cli.main import app

__all__ = ["app"]
