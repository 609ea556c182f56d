"""`clinphoto dicom conformance` (the DICOM Conformance Statement, generated from what the code supports) and
`clinphoto outbox list|retry|cancel` (what routing has to send, and what failed)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gateway.cli.common import MAX_ID, open_gateway, settings_or_exit

app = typer.Typer(help="The DICOM door.", no_args_is_help=True)


@app.command("conformance")
def conformance() -> None:
    """Print the DICOM Conformance Statement (PS3.2 layout) of this gateway's DICOM door."""
    from gateway.dicom.conformance import statement

    settings = settings_or_exit()
    print(statement(settings.ae_title, settings.dicom_port, idle_timeout=settings.dicom_idle_timeout,
                    max_associations=settings.dicom_max_associations, tls=settings.dicom_tls_cert is not None,
                    tls_client_ca=settings.dicom_tls_client_ca is not None), end="")


OUTBOX_STATUSES = ("pending", "delivered", "committed", "dead", "cancelled")
outbox_app = typer.Typer(help="Photos waiting to be forwarded to DICOM destinations (routing).", no_args_is_help=True)


@outbox_app.command("list")
def outbox_list(status: Annotated[str | None, typer.Option(help="Only items in this state: pending, delivered, committed, dead, cancelled.")] = None,
                limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many, newest first.")] = 50) -> None:
    """What waits, what was delivered, what failed and why."""
    from gateway.core import routing

    if status is not None and status not in OUTBOX_STATUSES:  # a typo listed an empty outbox with exit 0
        print(f"clinphoto: --status must be one of {', '.join(OUTBOX_STATUSES)}", file=sys.stderr)
        raise typer.Exit(2)

    gw = open_gateway()
    try:
        rows = routing.items(gw, status, limit)
    finally:
        gw.close()
    print(f"{'ID':>6}  {'STATUS':<10} {'DESTINATION':<16} {'TRIES':>5}  {'NEXT TRY (UTC)':<20} {'PHOTO':<32} LAST ERROR")
    for r in rows:
        next_try = r.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if r.status == "pending" else "-"
        print(f"{r.id:>6}  {r.status:<10} {r.destination:<16} {r.attempts:>5}  {next_try:<20} {r.asset_id:<32} {r.last_error or ''}")


@outbox_app.command("retry")
def outbox_retry(item: Annotated[int, typer.Argument(max=MAX_ID, help="The item's ID (clinphoto outbox list).")]) -> None:
    """Try a dead or cancelled item again, now, with its tries counted afresh."""
    from gateway.core import routing

    gw = open_gateway()
    try:
        done = routing.retry(gw, item)
    finally:
        gw.close()
    if not done:
        print(f"clinphoto: outbox item {item} is not dead or cancelled", file=sys.stderr)
        raise typer.Exit(1)
    print(f"outbox item {item}: pending again")


@outbox_app.command("cancel")
def outbox_cancel(item: Annotated[int, typer.Argument(max=MAX_ID, help="The item's ID (clinphoto outbox list).")]) -> None:
    """Stop trying to send an item (pending or dead)."""
    from gateway.core import routing

    gw = open_gateway()
    try:
        done = routing.cancel(gw, item)
    finally:
        gw.close()
    if not done:
        print(f"clinphoto: outbox item {item} is not pending or dead", file=sys.stderr)
        raise typer.Exit(1)
    print(f"outbox item {item}: cancelled")
