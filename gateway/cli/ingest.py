"""`clinphoto import DIR --manifest manifest.csv`: bulk import with a progress bar, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()


def import_command(
    folder: Annotated[Path, typer.Argument(help="Folder holding the photos; manifest paths are relative to it.", exists=True, file_okay=False)],
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="CSV manifest with a header row; its columns are listed above.")],
    rejected: Annotated[
        Path | None, typer.Option("--rejected", help="Where to write the CSV of rejected rows (default: next to the manifest).")
    ] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Resume file (default: DATA_DIR/imports/MANIFEST-ID.jsonl).")] = None,
    as_user: Annotated[str | None, typer.Option("--as", help="Who the audit trail names as importer (default: the OS user).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=16, help="Photos processed at once (decoding uses a core each).")] = 2,
) -> None:
    """Import a legacy photo archive through the ingest pipeline; re-run to resume.

    Manifest columns (a CSV header row; file and patient are required):

      file              the photo, relative to FOLDER
      patient           system|value, e.g. nhs|9449305552 or mrn|D100001
      encounter         visit number
      bodySite          SNOMED CT code (bodySiteDisplay: its name)
      laterality        left, right or both
      view, specialty   specialty: NHS Treatment Function code, e.g. 330
      sensitivity       N, R or V
      consentId         an existing consent, or a new one:
      consentLevel      record, teaching or publication
      consentGivenBy    patient, parent or best-interests
      consentCapturedBy, consentDate (YYYY-MM-DD)
      consentPurpose    for publication: the use consented to
      photographer, device, takenAt (ISO 8601), description
      session           photos sharing it form one series

    Refused rows go to the rejected CSV with the reason. Photos stored
    with no consent covering them (hidden for care until one is
    recorded) are counted and listed in the warnings CSV. Exit status 1
    when any row was refused.
    """
    from gateway.cli.common import open_gateway, operator_name
    from gateway.core.ingest.importer import ManifestError, read_manifest, run_import
    from gateway.core.ingest.request import Source

    try:
        total = len(read_manifest(manifest))
    except ManifestError as exc:
        console.print(f"clinphoto import: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    gw = open_gateway()
    source = Source.importer(as_user or operator_name())
    columns = (TextColumn("[bold]import"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    counts = {"created": 0, "existing": 0, "rejected": 0, "resumed": 0}
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("import", total=total, counts="")

            def tick(row, outcome: str) -> None:
                counts[outcome] = counts.get(outcome, 0) + 1
                progress.update(task, advance=1, counts=" ".join(f"{k} {v}" for k, v in counts.items() if v))

            summary = run_import(gw, folder, manifest, source, state_path=state, rejected_csv=rejected, on_progress=tick,
                                 workers=workers)
    except ManifestError as exc:  # the resume file (read before any row is imported)
        console.print(f"clinphoto import: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        gw.close()
    table = Table(title=f"import of {manifest.name}", show_header=False)
    for label, value in (("rows", summary.total), ("imported", summary.imported), ("already stored", summary.existing),
                         ("resumed (done earlier)", summary.resumed), ("rejected", summary.rejected),
                         ("stored without consent (hidden for care)", summary.uncovered),
                         ("seconds", f"{summary.seconds:.1f}"),
                         ("photos/s", f"{(summary.imported + summary.existing) / summary.seconds:.1f}" if summary.seconds else "-")):
        table.add_row(label, str(value))
    out.print(table)
    for note in summary.notes:
        console.print(f"clinphoto import: {note}", markup=False, highlight=False, soft_wrap=True)
    if summary.rejections and summary.rejected_csv is None:  # no file could hold them: the reasons, here
        for row, code, message in summary.rejections:
            console.print(f"row {row.number}: {code}: {message}", markup=False, highlight=False, soft_wrap=True)
    if summary.rejected_csv:
        out.print(f"rejected rows with reasons: {summary.rejected_csv}")
    if summary.warnings_csv:
        out.print(f"stored rows with warnings (no consent covers them): {summary.warnings_csv}")
    raise typer.Exit(1 if summary.rejected else 0)
