"""`clinphoto hl7 ...`: the stored messages, and sending test messages to a listener."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import MAX_ID

app = typer.Typer(help="HL7 v2 message store.", no_args_is_help=True)

STATUSES = ("applied", "ignored", "error", "rejected")


def _one_line(text: str | None) -> str:
    from mapping.escape import printable

    return printable(" ".join((text or "").split()))


@app.command("list")
def list_command(
    status: Annotated[str | None, typer.Option("--status", help="Only messages with this status: "
                                               + ", ".join(STATUSES) + ".")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, newest first.")] = 50,
) -> None:
    """List stored messages (newest first): id, received, sender, control id, type^event, status, error.

    The ids are what `clinphoto hl7 reprocess ID` takes. Patient data (names, NHS numbers) is not shown:
    the raw messages stay in the store.
    """
    from gateway.cli.common import open_gateway, print_table
    from gateway.hl7 import message_store

    if status is not None and status not in STATUSES:
        typer.echo(f"--status must be one of {', '.join(STATUSES)}", err=True)
        raise typer.Exit(2)
    gw = open_gateway()
    try:
        with gw.db.read() as session:
            rows = message_store.list_messages(session, status, limit)
    finally:
        gw.close()
    if not rows:
        typer.echo(f"no stored messages{' with status ' + status if status else ''}")
        return
    lines = [(str(r.id), r.received_at.strftime("%Y-%m-%d %H:%M:%S") if r.received_at else "-",
              _one_line(r.sender), _one_line(r.control_id), r.type_event or "-", r.status, _one_line(r.error))
             for r in rows]
    print_table(("ID", "RECEIVED (UTC)", "SENDER", "CONTROL ID", "TYPE", "STATUS", "ERROR"), lines)


@app.command("reprocess")
def reprocess(
    message_id: Annotated[int | None, typer.Argument(max=MAX_ID, help="Id of one stored message (see `clinphoto hl7 list`).")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Every stored message with this status, e.g. error.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=MAX_ID, help="At most this many (oldest first).")] = None,
) -> None:
    """Apply stored messages again (e.g. after a mapping fix); each gets the new status and ACK."""
    from gateway.cli.common import open_gateway, settings_or_exit
    from gateway.hl7 import message_store
    from gateway.hl7.listener import build_processor
    from store import audit

    if (message_id is None) == (status is None):
        typer.echo("give a message id or --status STATUS", err=True)
        raise typer.Exit(2)
    if status is not None and status not in STATUSES:  # a typo reprocessed nothing and said so with exit 0
        typer.echo(f"--status must be one of {', '.join(STATUSES)}", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit()
    gw = open_gateway(settings=settings)
    try:
        processor = build_processor(settings.hl7)
        if message_id is not None:
            ids = [message_id]
        elif status is not None:
            with gw.db.read() as session:
                ids = message_store.ids_with_status(session, status, limit)
        counts: dict[str, int] = {}
        for mid in ids:
            with gw.db.write() as session:
                try:
                    result = processor.reapply(session, mid)
                except LookupError as exc:
                    typer.echo(str(exc), err=True)
                    raise typer.Exit(1) from None
                info = message_store.summary(session, mid)
                assert info is not None  # reapply found it
                audit.append_many(session, result.audit)
            counts[result.status] = counts.get(result.status, 0) + 1
            line = (f"message {mid}: control id {_one_line(info.control_id)}, {info.type_event or '-'}: "
                    f"{result.previous_status} -> {result.status} ({result.code})")
            if result.status != "applied" and result.error:
                line += f": {_one_line(result.error)}"
            typer.echo(line)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do"
        typer.echo(f"reprocessed {len(ids)} message(s): {summary}")
    finally:
        gw.close()
    not_applied = counts.get("error", 0) + counts.get("rejected", 0)
    if not_applied:
        # a script running this after a mapping fix must see that the feed is not yet clean
        typer.echo(f"{not_applied} message(s) still not applied: fix the cause shown above and reprocess them again",
                   err=True)
        raise typer.Exit(1)


@app.command("send")
def send(
    files: Annotated[list[Path], typer.Argument(help="Files of HL7 v2 messages (as in fixtures/hl7/: unframed, "
                                                "segments on their own lines; several messages a file are fine); "
                                                "- reads standard input.")],
    host: Annotated[str, typer.Option(help="The MLLP listener's address.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Its port; default CLINPHOTO_MLLP_PORT (2575).")] = None,
    # an upper bound: socket.settimeout(1e308) was a traceback (OverflowError: timestamp out of range)
    timeout: Annotated[float, typer.Option(min=0.1, max=86400, help="Seconds to wait for the connection and for each ACK.")] = 30.0,
) -> None:
    """Send HL7 v2 messages over MLLP, in order over one connection, and print each ACK (a segment a line).

    Exit status 0 when every message was accepted (MSA-1 AA or CA), 1 otherwise: a script feeding test
    messages sees a refusal.
    """
    from gateway.cli.common import settings_or_exit
    from gateway.hl7.sender import ACCEPTED, BadMessageFile, ack_code, exchange, split_messages

    messages: list[bytes] = []
    try:
        for path in files:
            data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
            messages += split_messages(data, "standard input" if str(path) == "-" else str(path))
    except (OSError, BadMessageFile) as exc:
        typer.echo(f"clinphoto: {exc}", err=True)
        raise typer.Exit(2) from None
    if port is None:
        port = settings_or_exit().mllp_port
    refused = 0
    try:
        for number, ack in enumerate(exchange(host, port, messages, timeout), start=1):
            if number > 1:
                typer.echo("")
            typer.echo(ack.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n").rstrip("\n"))
            refused += ack_code(ack) not in ACCEPTED
    except OSError as exc:
        typer.echo(f"clinphoto: {host}:{port}: {exc or type(exc).__name__}", err=True)
        raise typer.Exit(1) from None
    if refused:
        typer.echo(f"{refused} of {len(messages)} message(s) not accepted (see the MSA and ERR segments above)", err=True)
        raise typer.Exit(1)
