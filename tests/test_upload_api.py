"""POST /api/v1/photos over HTTP: real app, real database, real multipart bodies."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gateway.api.schemas import UploadOut
from gateway.app import create_app
from gateway.http.bounded_head import BoundedHeadProtocol
from store.models import Asset, AuditEvent, Consent, Patient
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import NHS, add_patient

pytestmark = pytest.mark.usefixtures("validate_stored_dicom")



@pytest.fixture
def client(gw):
    with TestClient(create_app(gw)) as c:
        yield c


def full_metadata(patient: dict) -> dict:
    return {
        "patient": f"{NHS}|{patient['nhs']}",
        "encounter": patient["visit"],
        "bodySite": {"code": "368209003", "laterality": "right"},
        "view": "lateral",
        "specialty": "330",
        "sensitivity": "R",
        "consent": {"level": "teaching", "givenBy": "patient", "capturedBy": "Nurse Ada", "date": "2024-03-05"},
        "photographer": "Amy Jones",
        "device": "Ward iPhone 7",
        "takenAt": "2024-03-05T14:22:31Z",
        "description": "Healing wound, day 5",
    }


def post(client, gw, files, metadata, headers=None, **kw):
    parts = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in files]
    if metadata is not None:
        parts.append(("metadata", (None, json.dumps(metadata) if not isinstance(metadata, str) else metadata, "application/json")))
    h = auth_headers(gw, role="clinician", sub="dr.jones", specialties=["330"])
    h.update(headers or {})
    return client.post("/api/v1/photos", files=parts, headers=h, **kw)


def asset_count(gw) -> int:
    with gw.db.read() as s:
        return s.scalar(select(func.count()).select_from(Asset))


def test_upload_with_every_metadata_key(client, gw, fx):
    patient = add_patient(gw)
    r = post(client, gw, [fx["baseline_420.jpg"], fx["orient_6.jpg"]], full_metadata(patient))
    assert r.status_code == 201, r.text
    body = r.json()
    UploadOut.model_validate(body)  # the answer is what the OpenAPI document says
    with gw.db.read() as s:
        assert body["patient"]["id"] == s.get(Patient, patient["id"]).public_id and body["consentId"]
    assert len(body["photos"]) == 2
    p = body["photos"][0]
    for key in ("assetId", "mediaId", "studyInstanceUid", "seriesInstanceUid", "sopInstanceUid", "links"):
        assert p[key]
    assert p["links"]["self"] == f"/api/v1/photos/{p['assetId']}"
    with gw.db.read() as s:
        a = s.get(Asset, p["assetId"])
        assert (a.sensitivity, a.view, a.photographer, a.device, a.description) == (
            "R", "lateral", "Amy Jones", "Ward iPhone 7", "Healing wound, day 5"
        )
        assert a.body_site_code == "368209003" and a.laterality == "right" and a.specialty == "330"
        assert a.consent_id == body["consentId"] and a.original_filename == "baseline_420.jpg"
        assert s.get(Consent, body["consentId"]).captured_by == "Nurse Ada"


def test_repeat_content_gives_200_with_the_existing_asset(client, gw, fx):
    patient = add_patient(gw)
    meta = {"patient": f"nhs|{patient['nhs']}"}
    first = post(client, gw, [fx["baseline_420.jpg"]], meta)
    again = post(client, gw, [fx["baseline_420.jpg"]], meta)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["photos"][0]["assetId"] == first.json()["photos"][0]["assetId"]
    assert again.json()["photos"][0]["status"] == "existing"
    assert asset_count(gw) == 1


def test_idempotency_key_replays_the_first_answer(client, gw, fx):
    patient = add_patient(gw)
    meta = full_metadata(patient)
    first = post(client, gw, [fx["gray.jpg"]], meta, headers={"Idempotency-Key": "abc-1"})
    replay = post(client, gw, [fx["gray.jpg"]], meta, headers={"Idempotency-Key": "abc-1"})
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["replayed"] is True
    assert replay.json()["photos"] == first.json()["photos"]
    with gw.db.read() as s:  # the consent object was not created twice
        assert s.scalar(select(func.count()).select_from(Consent).where(Consent.scope == "photos")) == 1
    clash = post(client, gw, [fx["rgb.png"]], meta, headers={"Idempotency-Key": "abc-1"})
    assert clash.status_code == 422 and clash.json()["error"] == "idempotency-conflict"


@pytest.mark.parametrize(
    "name, status, code, words",
    [
        ("html.jpg", 415, "unsupported-type", "HTML"),
        ("svg.jpg", 415, "unsupported-type", "SVG"),
        ("pdf.jpg", 415, "unsupported-type", "PDF"),
        ("zip.jpg", 415, "unsupported-type", "ZIP"),
        ("truncated.jpg", 422, "corrupt", "truncated"),
        ("bomb.jpg", 422, "too-many-pixels", "megapixels"),
        ("cmyk.jpg", 422, "not-faithful", "CMYK"),
        ("gray16.png", 422, "not-faithful", "16-bit"),
    ],
)
def test_refusals_are_specific_and_store_nothing(client, gw, fx, name, status, code, words):
    patient = add_patient(gw)
    before = {b.sha256 for b in gw.blobs.iter_blobs()}
    r = post(client, gw, [fx["baseline_420.jpg"], fx[name]], {"patient": f"nhs|{patient['nhs']}"})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and words in body["message"]
    assert body["item"] == 1 and body["filename"] == name
    assert asset_count(gw) == 0
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == before
    with gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.outcome == "4")) == 1


def test_unknown_patient_names_the_identifier(client, gw, fx):
    r = post(client, gw, [fx["baseline_420.jpg"]], {"patient": "nhs|9999999999"})
    assert r.status_code == 422
    assert r.json()["error"] == "unknown-patient" and "9999999999" in r.json()["message"]


def test_mistyped_nhs_number_is_named_as_such(client, gw, fx):
    r = post(client, gw, [fx["baseline_420.jpg"]], {"patient": "nhs|9449305553"})
    assert r.status_code == 422
    assert r.json()["field"] == "patient" and "not a valid NHS number" in r.json()["message"]
    assert "check digit" in r.json()["message"]


def test_nhs_number_written_with_spaces_finds_the_patient(client, gw, fx):
    patient = add_patient(gw)
    spaced = f"{patient['nhs'][:3]} {patient['nhs'][3:6]} {patient['nhs'][6:]}"
    r = post(client, gw, [fx["baseline_420.jpg"]], {"patient": f"nhs|{spaced}"})
    assert r.status_code == 201, r.text


def test_photo_no_consent_covers_is_stored_with_a_warning(client, gw, fx):
    patient = add_patient(gw)
    with gw.db.write() as session:  # this patient has no consent on record at all
        session.delete(session.get(Consent, patient["consent_id"]))
    bare = post(client, gw, [fx["baseline_420.jpg"]], {"patient": f"nhs|{patient['nhs']}", "specialty": "330"})
    assert bare.status_code == 201
    assert bare.json()["photos"][0]["consentCovered"] is False
    assert "no consent covers 1 of these photo(s)" in bare.json()["warnings"][0]
    consented = post(client, gw, [fx["progressive.jpg"]], {
        "patient": f"nhs|{patient['nhs']}", "specialty": "330",
        "consent": {"level": "record", "givenBy": "patient", "capturedBy": "Nurse A", "date": "2026-11-26"}})
    assert consented.status_code == 201
    assert consented.json()["photos"][0]["consentCovered"] is True and "warnings" not in consented.json()


def test_unknown_keys_and_bad_values_are_named(client, gw, fx):
    patient = add_patient(gw)
    r = post(client, gw, [fx["baseline_420.jpg"]], {"patient": f"nhs|{patient['nhs']}", "colour": "blue", "sensitivity": "Q"})
    assert r.status_code == 422
    assert "colour" in r.json()["message"] and "sensitivity" in r.json()["message"]
    assert post(client, gw, [fx["baseline_420.jpg"]], "{not json").status_code == 422
    missing = post(client, gw, [fx["baseline_420.jpg"]], None)
    assert missing.status_code == 422 and "metadata" in missing.json()["message"]
    none = post(client, gw, [], {"patient": f"nhs|{patient['nhs']}"})
    assert none.status_code == 422 and none.json()["error"] == "no-files"


def test_authentication_and_role_are_required(client, gw, fx):
    patient = add_patient(gw)
    parts = [("files", ("a.jpg", fx["baseline_420.jpg"].read_bytes())), ("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"})))]
    assert client.post("/api/v1/photos", files=parts).status_code == 401
    gw.settings.ingest.upload_roles = ["nobody"]
    r = post(client, gw, [fx["baseline_420.jpg"]], {"patient": f"nhs|{patient['nhs']}"})
    assert r.status_code == 403 and "may not upload" in r.json()["message"]
    assert asset_count(gw) == 0


def test_refusals_are_audited(client, gw, fx):
    patient = add_patient(gw)
    read_only = auth_headers(gw, role="clinician", sub="dr.reader", specialties=["330"], scopes="user/Media.rs")
    parts = [("files", ("a.jpg", fx["baseline_420.jpg"].read_bytes())), ("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"})))]
    r = client.post("/api/v1/photos", files=parts, headers=read_only)
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    gw.settings.ingest.upload_roles = ["nobody"]
    assert post(client, gw, [fx["baseline_420.jpg"]], {"patient": f"nhs|{patient['nhs']}"}).status_code == 403
    with gw.db.read() as session:
        refused = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "4").order_by(AuditEvent.seq)).all()
        assert [(e.agent_who, e.detail["code"]) for e in refused] == [("dr.reader", "insufficient-scope"), ("dr.jones", "forbidden")]
        assert "scopes" in refused[0].outcome_desc
    assert asset_count(gw) == 0


def test_not_multipart_is_415(client, gw):
    r = client.post("/api/v1/photos", content=b"{}", headers={**auth_headers(gw), "Content-Type": "application/json"})
    assert r.status_code == 415


# --- a real server on 127.0.0.1, where streaming matters ---------------------------


@pytest.fixture
def live(gw):
    app = create_app(gw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=BoundedHeadProtocol))  # as `serve` parses
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def _streamed_body(boundary: str, metadata: dict, chunks: int, chunk: bytes):
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{json.dumps(metadata)}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
           "Content-Type: image/jpeg\r\n\r\n").encode()
    yield b"\xff\xd8\xff\xe0"
    for _ in range(chunks):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_oversized_upload_is_cut_off_while_streaming(live, gw):
    patient = add_patient(gw)
    gw.settings.ingest.max_bytes = 1024 * 1024
    boundary = "clinphotoboundary"
    headers = {**auth_headers(gw), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    body = _streamed_body(boundary, {"patient": f"nhs|{patient['nhs']}"}, 64, b"\x00" * 65536)  # 4 MiB, no Content-Length
    r = httpx.post(f"{live}/api/v1/photos", content=body, headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "too-large" and "1 MiB" in r.json()["message"]
    assert gw.spool.files() == []  # nothing left in this process's spool folder
    assert asset_count(gw) == 0


def test_upload_through_a_real_socket(live, gw, fx):
    patient = add_patient(gw)
    files = [("files", ("p.jpg", fx["progressive.jpg"].read_bytes(), "image/jpeg")),
             ("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"})))]
    r = httpx.post(f"{live}/api/v1/photos", files=files, headers=auth_headers(gw), timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["photos"][0]["transferSyntaxUid"] == "1.2.840.10008.1.2.4.50"


def test_concurrent_uploads_of_the_same_photo_store_it_once(live, gw, fx):
    patient = add_patient(gw)
    data = fx["baseline_420.jpg"].read_bytes()
    meta = json.dumps({"patient": f"nhs|{patient['nhs']}"})
    headers = auth_headers(gw)

    def send(_):
        files = [("files", ("same.jpg", data, "image/jpeg")), ("metadata", (None, meta))]
        return httpx.post(f"{live}/api/v1/photos", files=files, headers=headers, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes[0] in (200, 201) and codes.count(201) == 1 and set(codes) <= {200, 201}, [r.text for r in responses]
    assert len({r.json()["photos"][0]["assetId"] for r in responses}) == 1
    assert asset_count(gw) == 1


def test_unknown_form_part_is_named(client, gw, fx):
    patient = add_patient(gw)
    parts = [("file", ("a.jpg", fx["baseline_420.jpg"].read_bytes(), "image/jpeg")),
             ("metadata", (None, json.dumps({"patient": f"nhs|{patient['nhs']}"})))]
    r = client.post("/api/v1/photos", files=parts, headers=auth_headers(gw))
    assert r.status_code == 422 and "'file'" in r.json()["message"]
    assert asset_count(gw) == 0


def test_malformed_multipart_is_400(client, gw):
    headers = {**auth_headers(gw), "Content-Type": "multipart/form-data; boundary=xyz"}
    for body in (b"--xyz\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\nabc\r\n--nope", b"no boundary at all", b""):
        r = client.post("/api/v1/photos", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"] == "bad-request", body
    assert gw.spool.files() == []


def test_a_boundary_longer_than_the_parser_takes_is_400_saying_so(client, gw):
    """python-multipart raises from its constructor past 256 bytes: a 500 until the door checked it first. (Orthanc's
    73-character boundary, over RFC 2046's 70, is taken: test_dicomweb_orthanc.)"""
    for boundary, words in (("b" * 257, "257 characters"), ('""', "no boundary")):
        headers = {**auth_headers(gw), "Content-Type": f"multipart/form-data; boundary={boundary}"}
        body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{{}}\r\n--{boundary}--\r\n"
        r = client.post("/api/v1/photos", content=body.encode(), headers=headers)
        assert r.status_code == 400 and r.json()["error"] == "bad-request" and words in r.json()["message"], r.text
    assert gw.spool.files() == []


def test_every_accepted_format_uploads(client, gw, fx):
    patient = add_patient(gw)
    names = ["photo.heic", "rgb.png", "rgb.tif", "progressive.jpg", "orient_8.jpg", "baseline_444.jpg"]
    r = post(client, gw, [fx[n] for n in names], {"patient": f"nhs|{patient['nhs']}"})
    assert r.status_code == 201, r.text
    types = [p["mediaType"] for p in r.json()["photos"]]
    assert types == ["image/heic", "image/png", "image/tiff", "image/jpeg", "image/jpeg", "image/jpeg"]
    syntaxes = [p["transferSyntaxUid"] for p in r.json()["photos"]]
    assert syntaxes == ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.80",
                        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80"]
    assert [(p["width"], p["height"]) for p in r.json()["photos"]][4] == (96, 64)
