"""`clinphoto demo` photos: synthetic images through the real pipeline, conformant DICOM, varied metadata."""

from __future__ import annotations

from sqlalchemy import select

from gateway.demo import seed_demo
from store.models import Asset
from tests.conftest import require_tool
from tests.ingest_helpers import dicom_tools_check


def test_demo_photos_are_stored_varied_and_valid(gw, tmp_path):
    require_tool("dciodvfy", "dicom3tools")
    summary = seed_demo(gw)
    assert "photos" in summary
    with gw.db.read() as s:
        assets = s.execute(select(Asset)).scalars().all()
        rows = [(a.dicom_sha256, a.specialty, a.sensitivity, a.body_site_code, a.media_type, a.source) for a in assets]
    assert len(rows) >= 10
    assert {r[1] for r in rows} >= {"330", "160", "420", "100", "161"}
    assert {r[2] for r in rows} == {"N", "R", "V"}
    assert {r[4] for r in rows} >= {"image/jpeg", "image/png", "image/heic"}
    assert {r[5] for r in rows} == {"demo"}
    for i, (sha, *_rest) in enumerate(rows):
        path = tmp_path / f"demo{i}.dcm"
        path.write_bytes(gw.blobs.read_bytes(sha))
        dicom_tools_check(path)
    again = seed_demo(gw, force=True)  # seeding twice stores nothing new
    with gw.db.read() as s:
        assert len(s.execute(select(Asset.id)).all()) == len(rows)
    assert again


def test_the_mrn_shortcut_still_names_demo_patients_after_the_readmes_adt_example(gw):
    """make run's demo, then the README's ADT example (fixtures/hl7/adt_a01_admit.hl7): the demo's hospital numbers
    and the fed patient's are of the one trust, so `mrn|...` names either (it was refused as ambiguous between two
    MRN systems, and the bedside capture app looks patients up that way)."""
    from pathlib import Path

    from gateway.core import patient_refs
    from gateway.hl7.committer import GroupCommitter
    from gateway.hl7.config import Hl7Settings
    from gateway.hl7.listener import build_processor

    seed_demo(gw)
    raw = (Path(__file__).resolve().parent.parent / "fixtures" / "hl7" / "adt_a01_admit.hl7").read_bytes()
    processor = build_processor(Hl7Settings())
    [result] = GroupCommitter(gw.db, processor).apply_now([processor.prepare(raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r"))])
    assert result.code == "AA", result.error
    with gw.db.read() as s:
        demo = patient_refs.find(s, *patient_refs.parse("mrn|D100001"))
        fed = patient_refs.find(s, *patient_refs.parse("mrn|RX10001"))
        assert demo is not None and demo.family_name == "Okafor"
        assert fed is not None and fed.family_name == "SMITH"


def test_the_welcome_screen_names_a_configured_peer_to_echo_as(gw):
    """With peers configured the demo peer is gone, and so was the echoscu line: it names the first peer that may
    echo from this machine, on the address the DICOM listener binds; none when no peer may."""
    from gateway.core.policy.settings import DicomPeer
    from gateway.demo import welcome

    seed_demo(gw)
    gw.settings.auth.dicom_peers = [DicomPeer(ae_title="REMOTE", hosts=["10.1.2.3"]),
                                    DicomPeer(ae_title="FINDER", hosts=["127.0.0.1"], allow=["find"]),
                                    DicomPeer(ae_title="PACS1", hosts=["127.0.0.0/8"])]
    gw.settings.dicom_host = "0.0.0.0"
    lines = [line.strip() for line in welcome(gw, gw.settings, {"http": 8080, "dicom": 11112}).splitlines()]
    assert "echoscu -aet PACS1 -aec CLINPHOTO 127.0.0.1 11112" in lines
    gw.settings.auth.dicom_peers = gw.settings.auth.dicom_peers[:2]
    assert not any(line.startswith("echoscu") for line in welcome(gw, gw.settings, {"http": 8080, "dicom": 11112}).splitlines())


def test_the_welcome_screen_says_https_and_tls_when_the_doors_speak_them(gw, tmp_path):
    """The lines `make run` prints to paste: with a certificate on a door they name https:// and echoscu's +tls
    (with the client's own files named, not invented), where they printed http:// and plain echoscu."""
    from gateway.demo import welcome

    seed_demo(gw)
    plain = welcome(gw, gw.settings, {"http": 8080, "dicom": 11112})
    assert "http://127.0.0.1:8080/api/v1/photos" in plain and "+tls" not in plain
    gw.settings.http_tls_cert = gw.settings.dicom_tls_cert = tmp_path / "node.pem"
    secured = welcome(gw, gw.settings, {"http": 8080, "dicom": 11112})
    assert "http://" not in secured and "https://127.0.0.1:8080/api/v1/photos" in secured
    assert "echoscu +tls CLIENT.key CLIENT.crt +cf CA.pem -aet DEMOPACS -aec CLINPHOTO 127.0.0.1 11112" in secured
