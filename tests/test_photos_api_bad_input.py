"""Bad input is a 400/422 naming what is wrong, never a 500, on SQLite and PostgreSQL; refusals are still audited."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jwt
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import DataError

from gateway.app import BAD_VALUE, create_app
from gateway.core.identity import dev_private_key
from store import audit
from store.models import Asset, AuditEvent
from tests.access_matrix import build_access_matrix
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import NHS, add_patient, photo_fixtures
from tests.test_photos_api import api, audit_events, serving  # noqa: F401 (the live-server fixture)


def test_paging_parameters_are_bounded(gw, api):  # noqa: F811
    headers = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    for offset in ("99999999999999999999", "1000001", "-1"):
        r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552", "offset": offset}, headers=headers)
        assert r.status_code == 422 and "offset" in r.text, (offset, r.text)
    r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552", "limit": "99999999999999999999"}, headers=headers)
    assert r.status_code == 422
    assert api.get("/api/v1/photos", params={"patient": "nhs|9449305552", "offset": 1000000}, headers=headers).status_code == 200


def test_nul_bytes_in_the_url_are_400(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    photo = world.asset_ids["PA-01"]
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    cases = [
        api.get("/api/v1/photos/ab%00c", headers=mi),
        api.get("/api/v1/photos/ab%00c/image", headers=mi),
        api.get("/api/v1/photos", params={"patient": "a\x00|b"}, headers=mi),
        api.get("/api/v1/photos", params={"patient": "nhs|9449305552", "site": "12\x00"}, headers=mi),
        api.put(f"/api/v1/photos/{photo}/access/x%00y", headers=mi),
        api.delete(f"/api/v1/photos/{photo}/access/x%00y", headers=mi),
        api.get("/api/v1/consents", params={"patient": "a\x00|b"}, headers=mi),
        api.post("/api/v1/consents/ab%00c/withdraw", headers=mi),
    ]
    for r in cases:
        assert r.status_code == 400 and "NUL" in r.json()["detail"], (r.request.url, r.text)


def test_nul_bytes_and_long_values_in_consent_bodies(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    system, value = world.identifier("PA")
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    base = {"patient": f"{system}|{value}", "level": "record", "givenBy": "patient"}
    for body in ({**base, "capturedBy": "nurse\x00x"}, {**base, "patient": f"{system}|{value}\x00"},
                 {**base, "scope": "photos", "photos": ["ab\x00c"]}, {**base, "capturedBy": "n" * 201},
                 {**base, "scope": "photos", "photos": ["a" * 33]}):
        r = api.post("/api/v1/consents", json=body, headers=mi)
        assert r.status_code == 422, (body, r.text)
    r = api.post("/api/v1/consents", json={**base, "capturedBy": "nurse\x00x"}, headers=mi)
    assert "NUL" in r.text
    r = api.post("/api/v1/consents", json={**base, "patient": f"{system}|{'9' * 101}"}, headers=mi)
    assert r.status_code == 400 and "at most 100" in r.json()["detail"]
    r = api.get("/api/v1/photos", params={"patient": f"{'u' * 201}|1"}, headers=mi)
    assert r.status_code == 400 and "at most 200" in r.json()["detail"]


def test_over_long_purpose_header_is_refused_and_audited(gw, api):  # noqa: F811
    headers = {**auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"]), "X-Purpose-Of-Use": "TREATMENT-OF-THE-PATIENT-" * 4}
    r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers=headers)
    assert r.status_code == 400 and "unknown purpose of use" in r.json()["detail"]
    [refusal] = audit_events(gw, AuditEvent.subtype == "refused")
    assert refusal.agent_who == "dr.derm" and refusal.outcome == audit.MINOR_FAILURE
    assert len(refusal.purpose_of_use) == 20 and refusal.purpose_of_use.startswith("TREATMENT-OF-THE")
    with gw.db.read() as session:
        assert audit.verify(session).ok


def test_over_long_or_odd_token_subject_is_401_and_audited(gw, api):  # noqa: F811
    now = datetime.now(timezone.utc)
    key = dev_private_key(gw.settings)
    for sub in ("x" * 201, "dr\x00evil", " ", "ae:PACS1"):
        token = jwt.encode({"iss": "clinphoto-dev", "sub": sub, "exp": now + timedelta(minutes=5), "role": "clinician",
                            "scope": "user/Media.rs"}, key, algorithm="ES256")
        r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], r.text
    failures = audit_events(gw, AuditEvent.type_code == audit.LOGIN)
    assert len(failures) == 4 and "1-200 characters" in failures[0].outcome_desc and "control" in failures[1].outcome_desc
    assert "reserved for DICOM peers" in failures[3].outcome_desc
    token = jwt.encode({"iss": "clinphoto-dev", "sub": "y" * 200, "exp": now + timedelta(minutes=5), "role": "clinician",
                        "scope": "user/Media.rs"}, key, algorithm="ES256")
    assert api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    [search] = audit_events(gw, AuditEvent.subtype == "search")
    assert search.agent_who == "y" * 200


def test_audit_entries_fit_their_columns(gw):
    from gateway.core import access_audit

    entry = audit.AuditEntry(type_code="rest", action="E", subtype="s" * 80, agent_who="w" * 300, agent_role="r\x00" * 60,
                             purpose_of_use="P" * 25, outcome_desc="d\x00", entities=[{"id": "a\x00"}], detail={"k\x00": ["v\x00"]})
    access_audit.write(gw, [entry])
    [row] = audit_events(gw)
    assert len(row.subtype) == 50 and len(row.agent_who) == 200 and row.agent_who.endswith("\u2026")
    assert len(row.purpose_of_use) == 20 and "\x00" not in row.agent_role + row.outcome_desc
    assert row.entities == [{"id": "a\ufffd"}] and row.detail == {"k\ufffd": ["v\ufffd"]}
    with gw.db.read() as session:
        assert audit.verify(session).ok



def test_database_data_errors_are_400_without_sql(gw):
    app = create_app(gw)

    @app.get("/test/raise")
    def raise_data_error():
        raise DataError("SELECT secret FROM patients WHERE nhs = %(nhs)s", {"nhs": "9449305552"}, ValueError("value too long"))

    @app.get("/test/store")
    def store_bad_value():
        with gw.db.read() as session:  # on PostgreSQL the database itself refuses the value
            session.execute(select(Asset.id).where(Asset.id == "a\x00b", Asset.specialty == "9449305552\x00")).all()
        if gw.db.dialect == "sqlite":
            raise DataError("SELECT 1", {}, ValueError("emulated"))
        return {}

    with serving(app) as client:
        for path in ("/test/raise", "/test/store"):
            r = client.get(path)
            assert r.status_code == 400 and r.json() == {"error": "bad-request", "message": BAD_VALUE, "detail": BAD_VALUE}, r.text
            assert "SELECT" not in r.text and "9449305552" not in r.text


def test_upload_with_nul_bytes_in_metadata_or_file_name(gw, tmp_path):
    import json

    fx = photo_fixtures.make_all(tmp_path / "photos")
    patient = add_patient(gw)
    headers = auth_headers(gw, role="clinician", sub="dr.jones", specialties=["330"])
    meta = {"patient": f"{NHS}|{patient['nhs']}", "specialty": "330"}
    with TestClient(create_app(gw)) as client:
        for bad, key in (({**meta, "description": "wound\x00"}, "description"), ({**meta, "view": "lat\x00"}, "view"),
                         ({**meta, "consent": {"level": "record", "givenBy": "patient", "capturedBy": "n\x00"}}, "consent.capturedBy"),
                         ({**meta, "patient": f"{NHS}|{patient['nhs']}\x00"}, "patient")):
            with open(fx["gray.jpg"], "rb") as fh:
                r = client.post("/api/v1/photos", headers=headers,
                                files=[("files", ("a.jpg", fh, "image/jpeg")), ("metadata", (None, json.dumps(bad), "application/json"))])
            assert r.status_code == 422 and "NUL" in r.json()["message"] and r.json()["field"] == key, r.text
        # a raw NUL in the part's filename (clients would percent-encode it, so the body is made by hand)
        boundary = "b0undary"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="wou\x00nd.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + open(fx["gray.jpg"], "rb").read() + (
                f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n{json.dumps(meta)}\r\n--{boundary}--\r\n').encode()
        r = client.post("/api/v1/photos", headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}, content=body)
        assert r.status_code == 201, r.text
    with gw.db.read() as session:
        [asset] = session.scalars(select(Asset)).all()
        assert asset.original_filename == "wound.jpg"
