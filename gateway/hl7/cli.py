"""`clinphoto hl7 ...`: the stored messages."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="HL7 v2 message store.", no_args_is_help=True)


@app.command("reprocess")
def reprocess(
    message_id: Annotated[int | None, typer.Argument(help="Id of one stored message.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Every stored message with this status, e.g. error.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many (oldest first).")] = None,
) -> None:
    """Apply stored messages again (e.g. after a mapping fix); each gets the new status and ACK."""
    from gateway.cli import open_gateway
    from gateway.hl7 import message_store
    from gateway.hl7.listener import build_processor
    from store import audit

    if (message_id is None) == (status is None):
        typer.echo("give a message id or --status STATUS", err=True)
        raise typer.Exit(2)
    gw = open_gateway()
    try:
        processor = build_processor(gw.settings.hl7)
        if message_id is not None:
            ids = [message_id]
        else:
            with gw.db.read() as session:
                ids = message_store.ids_with_status(session, status, limit)
        counts: dict[str, int] = {}
        for mid in ids:
            with gw.db.write() as session:
                try:
                    result = processor.reapply(session, mid)
                except LookupError as exc:
                    typer.echo(str(exc), err=True)
                    raise typer.Exit(1)
                audit.append_many(session, result.audit)
            counts[result.status] = counts.get(result.status, 0) + 1
            typer.echo(f"message {mid}: {result.status} ({result.code})")
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do"
        typer.echo(f"reprocessed {len(ids)} message(s): {summary}")
    finally:
        gw.close()
