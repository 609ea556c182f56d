"""`clinphoto db`, `clinphoto store` and `clinphoto audit`: the schema, the blob store and the audit trail."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Annotated

import typer

from gateway.cli.common import console, open_gateway, out

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
store_app = typer.Typer(help="Blob store integrity.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit trail.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (also done at start-up)."""
    from store.migrate import current

    gw = open_gateway(migrate=True)
    out.print(f"database at revision {current(gw.db)}")
    gw.close()


@store_app.command("check")
def store_check(verify_hashes: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-hash every blob.")] = True) -> None:
    """Report missing blobs, hash mismatches, orphans and stale spool files; exit 1 if any."""
    from store.integrity import check_store

    gw = open_gateway(tidy=False)  # report what dead processes left, do not tidy it away first
    report = check_store(gw.db, gw.blobs, verify_hashes=verify_hashes, spool_root=gw.spool.root)
    gw.close()
    out.print(report.summary())
    raise typer.Exit(0 if report.clean else 1)


def parse_age(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise typer.BadParameter("use a number and a unit s, m, h or d, e.g. 24h")
    n, unit = int(match.group(1)), match.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


@store_app.command("gc")
def store_gc(
    older_than: Annotated[str, typer.Option("--older-than", help="Only orphans older than this (e.g. 24h) are removed.")] = "24h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed.")] = False,
) -> None:
    """Remove orphan blobs (no row refers to them) older than the given age, and stale spool files."""
    from store.integrity import collect_garbage, collect_spool

    age = parse_age(older_than)
    gw = open_gateway(tidy=False)  # gc itself removes (or with --dry-run lists) what dead processes left
    removed = collect_garbage(gw.db, gw.blobs, older_than=age, now=time.time(), dry_run=dry_run)
    spooled = collect_spool(gw.spool.root, dry_run=dry_run)
    gw.close()
    out.print(f"{'would remove' if dry_run else 'removed'} {len(removed)} orphan blob(s) and {len(spooled)} stale spool file(s)")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit hash chain, its genesis, head and anchor; exit 1 and name the first bad sequence number if broken."""
    from sqlalchemy.exc import SQLAlchemyError

    from store.audit import verify

    gw = open_gateway()
    try:
        with gw.db.read() as session:
            report = verify(session)
    except SQLAlchemyError as exc:  # one line, not a traceback (texts never quote parameters: hide_parameters)
        console.print(f"clinphoto: cannot read the audit trail: {' '.join(str(exc).split())[:300]}", markup=False,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        gw.close()
    if report.ok:
        anchor = f"anchored at record {report.anchored_seq}" if report.anchored_seq is not None else "no anchor file yet"
        out.print(f"audit trail intact: {report.checked} record(s), {anchor}", markup=False, highlight=False, soft_wrap=True)
        return
    if report.first_bad_seq is None:  # nothing to walk (a table dropped, the anchor unreadable)
        out.print(f"audit trail BROKEN: {report.reason}", markup=False, highlight=False, soft_wrap=True)
    else:
        # a walk stops at the bad record; the head, genesis and anchor are checked after a full walk
        counted = "verified before it" if report.checked < report.first_bad_seq else "chain correctly"
        out.print(f"audit trail BROKEN at sequence {report.first_bad_seq}: {report.reason} ({report.checked} record(s) "
                  f"{counted})", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)
