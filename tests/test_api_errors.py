"""Every refusal of the REST door, whoever raises it (the core's refusals, the auth layer, routing, FastAPI's own
parameter checks, the upload), has one body: error (a stable code), message, detail (kept for clients written
against FastAPI's bodies) and field when it is about one."""

from __future__ import annotations

import pytest

from tests.auth_helpers import auth_headers
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)


def assert_problem(r, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and isinstance(body["message"], str) and body["message"], body
    assert set(body) <= {"error", "message", "detail", "field", "item", "filename"}, body
    assert body.get("field") == field, body
    if isinstance(body["detail"], str):
        assert body["detail"] == body["message"]
    return body


@pytest.mark.parametrize("backend", ["sqlite"])  # the bodies are the door's, not the store's
def test_one_error_body_for_every_refusal(gw, api, backend):  # noqa: F811
    clinician = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    no_token = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"})
    assert_problem(no_token, 401, "not-authenticated")
    assert no_token.headers["www-authenticate"].startswith("Bearer realm=")  # the challenge is kept
    assert_problem(api.get("/api/v1/photos", params={"patient": "nhs|1234567890"}, headers=clinician), 400, "bad-request",
                   field="patient")
    assert_problem(api.get("/api/v1/patients", params={"identifier": "9449305552"}, headers=clinician), 400, "bad-request",
                   field="identifier")
    assert_problem(api.get("/api/v1/photos/" + "0" * 32, headers=clinician), 404, "not-found")
    teacher = auth_headers(gw, role="educator", sub="ed", purpose="TREAT")  # a purpose the role does not have
    assert_problem(api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers=teacher), 403, "forbidden")
    scoped = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"], scopes="user/Patient.rs")
    refused = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers=scoped)
    assert_problem(refused, 403, "insufficient-scope")
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    # FastAPI's own checks: the field named, its list of field errors kept as detail
    bad_limit = assert_problem(api.get("/api/v1/photos", params={"patient": "nhs|9449305552", "limit": "0"},
                                       headers=clinician), 422, "invalid", field="limit")
    assert bad_limit["message"].startswith("limit: ") and bad_limit["detail"][0]["loc"] == ["query", "limit"]
    bad_body = assert_problem(api.post("/api/v1/consents", json={"level": "record"}, headers=clinician), 422, "invalid",
                              field="patient")
    assert isinstance(bad_body["detail"], list)
    # routing, the upload and the edge
    assert_problem(api.get("/api/v1/nothing-here", headers=clinician), 404, "not-found")
    assert_problem(api.delete("/api/v1/photos", headers=clinician), 405, "method-not-allowed")
    assert_problem(api.post("/api/v1/photos", content=b"x", headers={**clinician, "Content-Type": "text/plain"}), 415,
                   "unsupported-media-type")
    assert_problem(api.get("/api/v1/photos", params={"patient": "nhs|94493\x0005552"}, headers=clinician), 400,
                   "bad-request")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_other_doors_keep_their_own_error_bodies(gw, api, backend):  # noqa: F811
    clinician = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    fhir = api.get("/fhir/Media/" + "0" * 32, headers=clinician)
    assert fhir.status_code == 404 and fhir.json()["resourceType"] == "OperationOutcome"
    console = api.get("/console/api/messages")
    assert console.status_code == 401 and "error" not in console.json() and console.json()["detail"]
