"""What the console tests share: stored HL7 messages (applied, failed, rejected), a dead routing item, a signed-in client."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import select

from gateway.core.context import Gateway
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source, governance
from gateway.core.policy.settings import DicomPeer
from gateway.core.routing import Route
from gateway.dicom.router import Router
from gateway.hl7.committer import GroupCommitter
from gateway.hl7.listener import build_processor
from store.models import AuditEvent, OutboxItem
from tests import dicom_objects as objects
from tests.auth_helpers import token_for
from tests.ingest_helpers import add_patient
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAPPING = ROOT / "mapping" / "default.yaml"
A01 = (ROOT / "fixtures" / "hl7" / "adt_a01_admit.hl7").read_bytes()  # SMITH, NHS number 9449305552
# a PAS that types its hospital numbers PI: the shipped mapping finds no identifier (AE 101) until told to
PI_TYPED = b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301100000||ADT^A28|PI-1|P|2.4\rPID|1||H1^^^RX1^PI||FIRSTPI^ANN\r"
BAD_VERSION = b"MSH|^~\\&|PAS|RX1|CP|RX1|20240301100000||ADT^A01|R-1|P|9.9\r"
PHI = ("SMITH", "9449305552", "FIRSTPI")


def mapping_that_misses_pi(gw: Gateway, tmp_path: Path) -> Path:
    """The gateway's mapping file: a copy of the shipped one (MR only), which the test may then fix."""
    path = tmp_path / "our-pas.yaml"
    path.write_text(DEFAULT_MAPPING.read_text())
    gw.settings.hl7.mapping_file = path  # type: ignore[attr-defined]
    return path


def fix_mapping(path: Path) -> None:
    """What the engineer does: hospital numbers typed PI are MRNs too."""
    path.write_text(path.read_text().replace("  - when: {type: [MR]}", "  - when: {type: [MR, PI]}"))


def receive(gw: Gateway, *raws: bytes) -> list:
    """Messages through the HL7 door's own processor and group commit, as the MLLP listener stores them."""
    processor = build_processor(gw.settings.hl7)  # type: ignore[attr-defined]
    return GroupCommitter(gw.db, processor).apply_now([processor.prepare(raw) for raw in raws])


def dead_outbox_item(gw: Gateway, fx: dict, tmp_path: Path) -> OutboxItem:
    """A photo routed to a PACS that is not listening, tried once (max_attempts 1): dead."""
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="PACS1", hosts=["127.0.0.1"], port=free_port(), allow=["echo"], name="Main PACS")]
    gw.settings.routing.routes = [Route(destination="PACS1", specialties=["330"])]
    gw.settings.routing.max_attempts = 1
    add_patient(gw, nhs="9990000018", mrn="M900", visit=None)
    sent = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "photo.dcm", PatientID="9990000018", IssuerOfPatientID="NHS")
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(sent)],
                              governance=governance(specialty="330")))
    Router(gw).round()
    with gw.db.read() as s:
        item = s.scalars(select(OutboxItem)).one()
        s.expunge_all()
    assert item.status == "dead", (item.status, item.last_error)
    return item


def sign_in(client: httpx.Client, gw: Gateway, role: str = "integration-engineer", sub: str = "ie.jo", **kw) -> httpx.Response:
    """The page's sign-in: the token once, in a header, for the session cookie (kept by the client)."""
    return client.post("/console/session", headers={"Authorization": f"Bearer {token_for(gw, role=role, sub=sub, **kw)}"})


def console_records(gw: Gateway, after_seq: int = 0) -> list[AuditEvent]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq)))
        s.expunge_all()
    return rows


def last_seq(gw: Gateway) -> int:
    rows = console_records(gw)
    return rows[-1].seq if rows else 0
