"""The mapping bench: what a message maps to and the ACK it would get, nothing committed.

One report for `clinphoto mapping test` and the console's bench (both read the mapping afresh), and the
re-application of a stored message as the console asks for it (`clinphoto hl7 reprocess` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy.orm import Session

from gateway.core.patients import UNSET
from gateway.hl7.pipeline import Processor


@dataclass
class BenchReport:
    report: dict[str, Any]  # mapping, message, control id, event time, patients, encounter, status
    ack: bytes | None  # None: enhanced mode asked for no accept ACK
    ok: bool  # would be applied or ignored


def plain(value: Any) -> Any:
    """A mapped value as JSON-ready data (dates ISO 8601, a field not sent said so)."""
    if value is UNSET:
        return "(not sent: kept)"
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)
                if not (f.name == "location" and type(value).__name__ == "IdentifierData")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def mapping_report(processor: Processor, raw: bytes, session: Session | None = None) -> BenchReport:
    """Parse and map `raw`; with a session, also apply it there for the exact ACK (the caller rolls it back)."""
    p = processor.prepare(raw.strip(b"\x0b\x1c"), "mapping-test")
    report: dict[str, Any] = {"mapping": processor.mapper.m.name, "message": f"{p.message_type}^{p.event}",
                              "control_id": p.control_id, "event_time": plain(p.event_time)}
    if p.mapped is not None:
        report["patients"] = [{"patient": plain(mp.patient), **({"merge_from": plain(mp.prior)} if mp.prior else {})}
                              for mp in p.mapped.patients]
        report["encounter"] = plain(p.mapped.encounter)
    if session is not None:
        result = processor.apply(session, p)
        if result.duplicate:
            # the store already holds this sender + control id: a resend gets the stored ACK, nothing applied
            report["status"] = f"duplicate of stored message {result.message_id} ({result.status}): not applied again"
        else:
            # the transaction is rolled back: say what would happen, never that it did
            report["status"] = f"would be {result.status}"
        report["committed"] = False
        return BenchReport(report, result.ack, result.status in ("applied", "ignored"))
    report["status"], ack = processor.dry_run(p)
    return BenchReport(report, ack, report["status"] in ("would be applied", "would be ignored"))
