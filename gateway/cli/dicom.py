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
    _outbox_change(item, "retry", ("dead", "cancelled"), "pending again")


@outbox_app.command("cancel")
def outbox_cancel(item: Annotated[int, typer.Argument(max=MAX_ID, help="The item's ID (clinphoto outbox list).")]) -> None:
    """Stop trying to send an item (pending or dead)."""
    _outbox_change(item, "cancel", ("pending", "dead"), "cancelled")


def _outbox_change(item: int, change: str, from_statuses: tuple[str, ...], done_text: str) -> None:
    """Retry or cancel one item, on the audit trail as the console's are (the operator named as every CLI record
    names them); an item that is not there, or not in a status the change applies to, is said as it is."""
    from gateway.cli.common import operator_name
    from gateway.core import access_audit, routing
    from store import audit

    gw = open_gateway()
    try:
        done = (routing.retry if change == "retry" else routing.cancel)(gw, item)
        status = None if done else routing.status(gw, item)
        access_audit.write(gw, [audit.AuditEntry(
            type_code=audit.APPLICATION_ACTIVITY, action="U", subtype=f"outbox-{change}",
            outcome=audit.SUCCESS if done else audit.MINOR_FAILURE, agent_who=operator_name(), agent_role="operator",
            agent_network="local", entities=[{"type": "outbox-item", "id": item}])])
    finally:
        gw.close()
    if not done:
        why = "no such item" if status is None else f"it is {status}; only {' or '.join(from_statuses)} items can be"
        print(f"clinphoto: outbox item {item}: {why}", file=sys.stderr)
        raise typer.Exit(1)
    print(f"outbox item {item}: {done_text}")
