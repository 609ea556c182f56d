"""`clinphoto dicom conformance`: the DICOM Conformance Statement, generated from what the code supports."""

from __future__ import annotations

import typer

from gateway.cli.common import settings_or_exit

app = typer.Typer(help="The DICOM door.", no_args_is_help=True)


@app.command("conformance")
def conformance() -> None:
    """Print the DICOM Conformance Statement (PS3.2 layout) of this gateway's DICOM door."""
    from gateway.dicom.conformance import statement

    settings = settings_or_exit()
    print(statement(settings.ae_title, settings.dicom_port), end="")
