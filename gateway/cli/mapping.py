"""`clinphoto mapping check M.yaml` and `clinphoto mapping test FILE.hl7 [--mapping M.yaml]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mapping.schema import DEFAULT_MAPPING, MappingFileError, load_mapping

app = typer.Typer(help="HL7 mapping files: validate them and try messages through them.", no_args_is_help=True)


def _load(path: Path | None):
    try:
        return load_mapping(path or DEFAULT_MAPPING)
    except MappingFileError as exc:
        typer.echo(f"invalid mapping: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("check")
def check(mapping_file: Annotated[Path, typer.Argument(help="Mapping YAML to validate.")]) -> None:
    """Validate a mapping file; every error is listed with its file, line and key."""
    try:
        m = load_mapping(mapping_file)
    except MappingFileError as exc:
        typer.echo(f"invalid mapping: {len(exc.problems)} error(s)", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem.where()}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{mapping_file}: mapping {m.name!r} is valid "
               f"({len(m.identifiers)} identifier rule(s), {len(m.tables)} table(s))")


@app.command("test")
def test(
    message_file: Annotated[Path, typer.Argument(help="An HL7 v2 message (segments separated by CR or newlines).")],
    mapping_file: Annotated[Path | None, typer.Option("--mapping", "-m", help="Mapping YAML; default the configured one.")] = None,
    database: Annotated[bool, typer.Option(
        "--database/--no-database",
        help="Also apply it to the configured database inside a transaction that is rolled back, for the exact ACK.")] = False,
) -> None:
    """Parse and map a message without committing; print the patient, encounter and the ACK it would get."""
    from gateway.hl7.bench import mapping_report
    from gateway.hl7.config import Hl7Settings
    from gateway.hl7.pipeline import Processor
    from mapping.engine import Mapper

    hl7_settings = Hl7Settings()
    if mapping_file is None or database:
        from gateway.cli.common import settings_or_exit

        hl7_settings = settings_or_exit().hl7
    mapping = _load(mapping_file or hl7_settings.mapping_file)
    processor = Processor(hl7_settings, Mapper(mapping, {"mrn_system": hl7_settings.mrn_system}))
    try:
        raw = message_file.read_bytes()
    except OSError as exc:
        typer.echo(f"cannot read {message_file}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    if database:
        from gateway.cli.common import open_gateway

        gw = open_gateway()
        try:
            with gw.db.read() as session:  # rolled back at exit: nothing is committed
                bench = mapping_report(processor, raw, session)
        finally:
            gw.close()
    else:
        bench = mapping_report(processor, raw)
    report, ack, ok = bench.report, bench.ack, bench.ok
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    if database:
        typer.echo("nothing was committed: the database transaction was rolled back")
    typer.echo("ACK it would send:" if ack else "no ACK would be sent (enhanced mode, as MSH-15 asks)")
    if ack:
        typer.echo(ack.decode("utf-8", errors="replace").replace("\r", "\n"))
    raise typer.Exit(0 if ok else 1)
