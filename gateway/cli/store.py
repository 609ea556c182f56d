"""`clinphoto db`, `clinphoto store` and `clinphoto audit`: the schema, the blob store and the audit trail."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Annotated

import typer
from sqlalchemy import select

from gateway.cli.common import MAX_ID, console, open_gateway, out, print_table
from gateway.core import patient_refs
from store.models import Patient

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
store_app = typer.Typer(help="Blob store integrity.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit trail.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (also done at start-up)."""
    from store.migrate import current

    gw = open_gateway(migrate=True, create=True)
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
    try:
        return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
    except OverflowError:  # was a traceback (99999999999d)
        raise typer.BadParameter(f"{text.strip()} is longer than any age the store can hold") from None


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


def _since(text: str) -> datetime:
    """An age (24h, 7d, 30m) before now, or a date or date-time (2026-12-01, 2026-12-01T08:00), in UTC."""
    if re.fullmatch(r"\d+[smhd]", text.strip()):
        try:
            return datetime.now(timezone.utc) - parse_age(text)
        except OverflowError:  # before year 1 (800000d): a traceback before; every record is later than that
            return datetime.min.replace(tzinfo=timezone.utc)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter("use an age such as 24h or 7d, or a date such as 2026-12-01") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


@audit_app.command("list")
def audit_list(
    patient: Annotated[str | None, typer.Option("--patient", help="Only records about this patient: system|value "
                                                "(e.g. nhs|9990000018), the patient's id as the API and `patients list` "
                                                "show it, or the record's patient number.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only what this person (token subject) or DICOM peer (AE title) did.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only this event type: a code (110113, rest) or a name "
                                              "(\"security alert\", import, query, \"patient record\").")] = None,
    outcome: Annotated[str | None, typer.Option("--outcome", help="success, failure (refusals and errors), or a code 0/4/8/12.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only records since: an age (24h, 7d) or a date (2026-12-01).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, every field.")] = False,
) -> None:
    """List audit records, newest first: sequence number, time, type, action, outcome, who, from where, patient id,
    what. Records carry ids, not names; `clinphoto audit show SEQ` prints one in full."""
    from store import audit_read

    wanted_type = audit_read.type_code_of(type_) if type_ else None
    if type_ and wanted_type is None:
        raise typer.BadParameter(f"unknown type {type_!r}; use one of {', '.join(audit_read.TYPE_NAMES)} or their names",
                                 param_hint="--type")
    if outcome and outcome not in ("success", "failure", *audit_read.OUTCOME_NAMES):
        raise typer.BadParameter("use success, failure, 0, 4, 8 or 12", param_hint="--outcome")
    filters = audit_read.Filters(agent=user, type_code=wanted_type, outcome=outcome, limit=limit,
                                 since=_since(since) if since else None)
    gw = open_gateway()
    try:
        with gw.db.read() as session:
            if patient is not None:
                if patient.strip().isdigit() and int(patient) <= MAX_ID:
                    filters = replace(filters, patient_id=int(patient))
                else:
                    try:
                        ref = (patient_refs.PUBLIC_ID, patient.strip()) if "|" not in patient else patient_refs.parse(patient)
                        found = patient_refs.find(session, *ref)
                    except patient_refs.BadPatientRef as exc:
                        raise typer.BadParameter(str(exc), param_hint="--patient") from None
                    if found is None:
                        console.print(f"clinphoto: no patient {patient}", markup=False, highlight=False)
                        raise typer.Exit(1)
                    filters = replace(filters, patient_id=found.id)
            rows = [audit_read.as_dict(e) for e in audit_read.find(session, filters)]
            # the id the API and `patients list` show beside the record's patient number, so one leads to the other
            numbers = {row["patientId"] for row in rows if row["patientId"] is not None}
            public = dict(session.execute(select(Patient.id, Patient.public_id).where(Patient.id.in_(numbers))).tuples().all()) \
                if numbers else {}
            for row in rows:
                number = row["patientId"]
                row["patientPublicId"] = public.get(number) if isinstance(number, int) else None
    finally:
        gw.close()
    if as_json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False, default=str))
        return
    if not rows:
        out.print("no audit records match", markup=False, highlight=False)
        return
    lines = []
    for row in rows:
        what = " - ".join(" ".join(str(x).split()) for x in (row["subtype"], row["outcomeDescription"]) if x)
        lines.append((str(row["seq"]), str(row["recordedAt"]).replace("T", " ").removesuffix("Z"), str(row["typeName"]),
                      str(row["action"]), str(row["outcomeName"]), str(row["agent"] or "-"), str(row["agentNetwork"] or "-"),
                      str(row["patientPublicId"] or row["patientId"] or "-"), what[:160]))
    print_table(("SEQ", "TIME (UTC)", "TYPE", "ACT", "OUTCOME", "WHO", "FROM", "PATIENT", "WHAT"), lines)


@audit_app.command("show")
def audit_show(seq: Annotated[int, typer.Argument(max=MAX_ID, help="The record's sequence number (see `clinphoto audit list`).")]) -> None:
    """Print one audit record in full, as JSON."""
    from store import audit_read

    gw = open_gateway()
    try:
        with gw.db.read() as session:
            event = audit_read.one(session, seq)
            row = audit_read.as_dict(event) if event is not None else None
    finally:
        gw.close()
    if row is None:
        console.print(f"clinphoto: no audit record {seq}", markup=False, highlight=False)
        raise typer.Exit(1)
    print(json.dumps(row, ensure_ascii=False, indent=2, default=str))
