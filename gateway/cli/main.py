"""`clinphoto` command line: every command group, one line each."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli import auth, common, dicom, hl7, ingest, mapping, patients, quarantine, store
from gateway.cli.common import console, open_gateway, out, settings_or_exit

app = typer.Typer(help="clinphoto: clinical photo gateway", no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say which data directory and database are used.")]
            = False) -> None:
    """clinphoto: clinical photo gateway. Commands read settings from CLINPHOTO_* variables (or the YAML file named
    by CLINPHOTO_CONFIG) and the store in the data directory (default ./var below the current folder)."""
    common.verbose = verbose


@app.command()
def serve(welcome: Annotated[bool, typer.Option("--welcome", help="Once every door listens, print the demo patients, a "
                                                "dev token and lines to try (dev mode; what `make run` does).")] = False) -> None:
    """Run the gateway: HTTP API, MLLP and DICOM listeners in one process."""
    from gateway.core.log_setup import configure_logging
    from gateway.demo import welcome as welcome_text
    from gateway.serve import StartupError, run

    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    gw = open_gateway(settings=settings, create=True)

    def ready(ports: dict[str, int]) -> None:
        if welcome:
            print(welcome_text(gw, settings, ports), flush=True)

    try:
        run(gw, settings, on_ready=ready)
    except StartupError as exc:
        console.print(f"clinphoto: cannot start {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def demo(force: Annotated[bool, typer.Option(help="Seed again even if demo data exists.")] = False) -> None:
    """Seed synthetic demo patients, encounters, consents and photos (once)."""
    from gateway.demo import seed_demo

    gw = open_gateway(create=True)
    try:
        summary = seed_demo(gw, force=force)
    finally:
        gw.close()
    out.print(summary)


# -- command groups: one line each (keep this marker) --
app.add_typer(store.db_app, name="db")
app.add_typer(store.store_app, name="store")
app.add_typer(store.audit_app, name="audit")
app.command("import")(ingest.import_command)
auth.register(app)
app.add_typer(hl7.app, name="hl7")
app.add_typer(mapping.app, name="mapping")
app.add_typer(patients.app, name="patients")
app.add_typer(quarantine.app, name="quarantine")
app.add_typer(dicom.app, name="dicom")
app.add_typer(dicom.outbox_app, name="outbox")
