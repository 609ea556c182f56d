"""Wiring: the HL7 door's services as the console door's callables (a door never imports another).

Each reads the mapping file afresh, as `clinphoto hl7 reprocess` and `clinphoto mapping test` do: the console is
where a mapping fix is tried and applied to the messages that failed, while the MLLP listener keeps the mapping it
loaded at start-up until the gateway restarts."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from gateway.console.tools import Bench, Hl7Tools, MappingCheck
from gateway.core.context import Gateway
from gateway.core.operations import Reapplied
from gateway.core.refusals import Kind, Refused
from gateway.hl7.bench import mapping_report
from gateway.hl7.config import Hl7Settings
from gateway.hl7.listener import build_processor
from gateway.hl7.pipeline import Processor
from mapping.schema import DEFAULT_MAPPING, MappingFileError, load_mapping


def hl7_tools(hl7: Hl7Settings | None) -> Hl7Tools:
    settings = hl7 or Hl7Settings()

    def processor() -> Processor:
        try:
            return build_processor(settings)
        except MappingFileError as exc:
            raise Refused(Kind.CONFLICT, f"the mapping file does not validate: {exc}") from None

    def reapply(session: Session, message_id: int) -> Reapplied:
        r = processor().reapply(session, message_id)
        return Reapplied(status=r.status, previous_status=r.previous_status, ack_code=r.code, error=r.error,
                         patient_id=r.patient_id, audit=r.audit)

    def bench(gw: Gateway, raw: bytes, database: bool) -> Bench:
        try:
            p = processor()
        except Refused as exc:
            return Bench({"status": "not mapped", "error": exc.reason}, None, False)
        if database:
            with gw.db.read() as session:  # rolled back at exit: nothing is committed
                out = mapping_report(p, raw, session)
        else:
            out = mapping_report(p, raw)
        return Bench(out.report, out.ack.decode("utf-8", errors="replace") if out.ack else None, out.ok)

    def mapping() -> MappingCheck:
        path = Path(settings.mapping_file or DEFAULT_MAPPING)
        try:
            content = path.read_bytes()
        except OSError as exc:
            return MappingCheck(str(path), settings.mapping_file is None, None, False, [f"{path}: cannot read: {exc.strerror}"])
        common = {"path": str(path), "default": settings.mapping_file is None, "sha256": hashlib.sha256(content).hexdigest(),
                  "text": content.decode("utf-8", errors="replace")}
        try:
            m = load_mapping(path)
        except MappingFileError as exc:
            return MappingCheck(name=None, valid=False, problems=[p.where() for p in exc.problems], **common)  # type: ignore[arg-type]
        return MappingCheck(name=m.name, valid=True, summary=f"{len(m.identifiers)} identifier rule(s), {len(m.tables)} table(s)",
                            **common)  # type: ignore[arg-type]

    return Hl7Tools(reapply=reapply, bench=bench, mapping=mapping)
