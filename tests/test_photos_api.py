"""The REST photos door over a real socket, with the access matrix: zero leaks, zero misses."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from gateway.app import create_app
from gateway.core.policy.rules import scope_allows
from gateway.http.bounded_head import BoundedHeadProtocol
from store import audit
from store.models import AuditEvent
from tests.access_matrix import PATIENTS, PHOTOS, ROLE_PURPOSES, USERS, build_access_matrix, expected_visible
from tests.auth_helpers import auth_headers, token_for


def live_server(gw):
    """The gateway's FastAPI app on a free 127.0.0.1 port, in a thread."""
    return serving(create_app(gw))


@contextmanager
def serving(app, port: int = 0):
    """An ASGI app on a free 127.0.0.1 port (or the one given), in a thread; yields an httpx client for it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=BoundedHeadProtocol))  # as `clinphoto serve` parses HTTP
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(gw):
    with live_server(gw) as client:
        yield client


def audit_events(gw, *where) -> list[AuditEvent]:
    """Audit records matching the conditions, in order, usable after the session ends."""
    with gw.db.read() as session:
        rows = list(session.scalars(select(AuditEvent).where(*where).order_by(AuditEvent.seq)))
        session.expunge_all()
    return rows


def refused_outright(user) -> bool:
    """The role may not act for the purpose at all: the door answers 403 rather than an empty result."""
    return user.purpose not in ROLE_PURPOSES.get(user.role, set())


def test_access_matrix_through_list_read_and_image(gw, api):
    world = build_access_matrix(gw)
    leaks, misses = [], []
    for user in USERS:
        headers = world.headers(gw, user)
        for patient in PATIENTS:
            system, value = world.identifier(patient)
            r = api.get("/api/v1/photos", params={"patient": f"{system}|{value}", "limit": 200}, headers=headers)
            if refused_outright(user) or not scope_allows(user.scopes, "Media", "s"):
                # a role that may not act for the purpose, or a token no scope of which allows searching photos
                assert r.status_code == 403, (user.key, r.text)
                continue
            assert r.status_code == 200, (user.key, r.text)
            body = r.json()
            got = {item["id"] for item in body["items"]}
            want = world.visible_asset_ids(user, patient)
            leaks += [f"list: {user.key} sees {world.asset_keys[a]}" for a in got - want]
            misses += [f"list: {user.key} misses {world.asset_keys[a]}" for a in want - got]
            assert body["total"] == len(want), (user.key, patient)
        for photo in PHOTOS:
            asset_id = world.asset_ids[photo.key]
            visible = asset_id in world.visible_asset_ids(user)
            r = api.get(f"/api/v1/photos/{asset_id}", headers=headers)
            preview = api.get(f"/api/v1/photos/{asset_id}/image", params={"rendition": "preview"}, headers=headers)
            original = api.get(f"/api/v1/photos/{asset_id}/image", params={"rendition": "original"}, headers=headers)
            if refused_outright(user):
                assert {r.status_code, preview.status_code, original.status_code} == {403}
                continue
            if visible:
                if r.status_code != 200 or preview.status_code != 200:
                    misses.append(f"read: {user.key} cannot open {photo.key} ({r.status_code}/{preview.status_code})")
                    continue
                assert r.json()["id"] == asset_id and r.json()["sensitivity"] == photo.sensitivity
                assert preview.content == gw.blobs.read_bytes(world.sha256[(photo.key, "preview")])
                assert preview.headers["content-type"] == "image/jpeg"
                assert "gzip" not in preview.headers.get("content-encoding", "")
                if user.role == "medical-illustration":
                    assert original.status_code == 200 and original.content == gw.blobs.read_bytes(world.sha256[(photo.key, "original")])
                    assert "original" in r.json()["links"]
                else:
                    assert original.status_code == 403, (user.key, photo.key, original.text)
                    assert "original" not in r.json()["links"]
            elif photo.status == "entered-in-error" and expected_visible(user, replace(photo, status="active")):
                # taken out of the record: 410 to who could otherwise see it (the original: 403 first for most roles)
                assert r.status_code == preview.status_code == 410, (user.key, photo.key)
                assert original.status_code in (403, 410)
            else:
                for resp, what in ((r, "read"), (preview, "preview"), (original, "original")):
                    if resp.status_code != 404:
                        leaks.append(f"{what}: {user.key} got {resp.status_code} for hidden {photo.key}")
                    else:
                        assert resp.json() == {"error": "not-found", "message": "photo not found", "detail": "photo not found"}
    assert not leaks and not misses, "\n".join(leaks + misses)


def test_hidden_photo_looks_exactly_like_a_missing_one(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    plastics = next(u for u in USERS if u.key == "plastics")
    hidden = world.asset_ids["PA-03"]  # R dermatology photo
    assert hidden not in world.visible_asset_ids(plastics)
    headers = world.headers(gw, plastics)
    a = api.get(f"/api/v1/photos/{hidden}", headers=headers)
    b = api.get("/api/v1/photos/0123456789abcdef0123456789abcdef", headers=headers)
    assert a.status_code == b.status_code == 404 and a.content == b.content
    denial = audit_events(gw, AuditEvent.outcome == audit.MINOR_FAILURE)
    assert any(e.entities[0]["id"] == hidden and "specialty" in (e.outcome_desc or "") for e in denial)
    mine = [e for e in denial if e.entities[0]["id"] == hidden][0]
    assert mine.agent_who == "dr.plastics" and mine.patient_id == world.patient_ids["PA"] and mine.agent_network == "127.0.0.1"
    assert mine.purpose_of_use == "TREAT" and any("DENIED" in r for r in mine.detail["reasons"])


def test_paging_newest_first_with_right_totals(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    mi = next(u for u in USERS if u.key == "illustration")
    headers = world.headers(gw, mi)
    system, value = world.identifier("PA")
    want = world.visible_asset_ids(mi, "PA")
    seen, url, params = [], "/api/v1/photos", {"patient": f"{system}|{value}", "limit": 3}
    while url:
        body = api.get(url, params=params, headers=headers).json()
        assert body["total"] == len(want) and len(body["items"]) <= 3
        seen += body["items"]
        url, params = body["links"].get("next"), None
    assert [i["id"] for i in seen] and {i["id"] for i in seen} == want and len(seen) == len(want)
    taken = [i["takenAt"] or i["storedAt"] for i in seen]
    assert taken == sorted(taken, reverse=True)
    item = seen[0]
    assert {"description", "originalFilename", "bodySite", "specialty", "sensitivity", "consent", "takenAt", "links"} <= item.keys()
    assert item["consent"]["level"] == "teaching" and item["links"]["thumbnail"].endswith("rendition=thumbnail")


def test_search_is_audited_once_per_patient(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    derm = next(u for u in USERS if u.key == "derm")
    system, value = world.identifier("PA")
    r = api.get("/api/v1/photos", params={"patient": f"{system}|{value}"}, headers=world.headers(gw, derm))
    assert r.status_code == 200
    events = audit_events(gw, AuditEvent.subtype == "search")
    with gw.db.read() as session:
        assert audit.verify(session).ok
    assert len(events) == 1
    e = events[0]
    assert e.action == "E" and e.type_code == audit.REST and e.outcome == audit.SUCCESS
    assert e.patient_id == world.patient_ids["PA"] and e.agent_who == "dr.derm" and e.purpose_of_use == "TREAT"
    assert e.entities[0]["type"] == "query" and value in e.entities[0]["query"]
    assert {x["id"] for x in e.entities if x["type"] == "asset"} == world.visible_asset_ids(derm, "PA")
    # a search finding nothing is still recorded, without a patient
    api.get("/api/v1/photos", params={"patient": f"{system}|NOBODY"}, headers=world.headers(gw, derm))
    events = audit_events(gw, AuditEvent.subtype == "search")
    assert len(events) == 2 and events[1].patient_id is None and events[1].detail["returned"] == 0
    # a system no patient has is a mistake: 400 naming the known systems, and the refusal is on the trail
    wrong = api.get("/api/v1/photos", params={"patient": "urn:nowhere|42"}, headers=world.headers(gw, derm))
    assert wrong.status_code == 400 and "unknown identifier system 'urn:nowhere'" in wrong.json()["detail"]
    assert system in wrong.json()["detail"] and "aliases: nhs, nhs-number, mrn" in wrong.json()["detail"]
    assert audit_events(gw, AuditEvent.subtype == "refused")[-1].outcome == audit.MINOR_FAILURE


def test_break_glass_needs_a_reason_and_is_audited(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    system, value = world.identifier("PB")
    query = {"patient": f"{system}|{value}"}
    no_reason = auth_headers(gw, role="clinician", sub="dr.ed", specialties=["180"], purpose="ETREAT")
    r = api.get("/api/v1/photos", params=query, headers=no_reason)
    assert r.status_code == 403 and "reason" in r.json()["detail"]
    blank = auth_headers(gw, role="clinician", sub="dr.ed", specialties=["180"], purpose="ETREAT", break_glass="")
    assert api.get("/api/v1/photos", params=query, headers=blank).status_code == 403
    wrong_purpose = auth_headers(gw, role="clinician", sub="dr.ed", specialties=["180"], break_glass="because")
    assert api.get("/api/v1/photos", params=query, headers=wrong_purpose).status_code == 400
    educator = auth_headers(gw, role="educator", sub="ed.teacher", purpose="ETREAT", break_glass="because")
    assert api.get("/api/v1/photos", params=query, headers=educator).status_code == 403
    refusals = audit_events(gw, AuditEvent.subtype == "refused")
    assert len(refusals) == 4 and all(e.outcome == audit.MINOR_FAILURE for e in refusals)
    assert sum(e.type_code == audit.SECURITY_ALERT for e in refusals) == 4

    ed = next(u for u in USERS if u.key == "ed-breakglass")
    r = api.get("/api/v1/photos", params=query, headers=world.headers(gw, ed))
    assert r.status_code == 200 and {i["id"] for i in r.json()["items"]} == world.visible_asset_ids(ed, "PB")
    alerts = audit_events(gw, AuditEvent.type_code.in_([audit.SECURITY_ALERT, audit.EMERGENCY_OVERRIDE]), AuditEvent.outcome == audit.SUCCESS)
    [search] = audit_events(gw, AuditEvent.subtype == "search")
    assert {e.type_code for e in alerts} == {audit.SECURITY_ALERT, audit.EMERGENCY_OVERRIDE}
    assert all(e.detail["break_glass_reason"] == ed.break_glass and e.patient_id == world.patient_ids["PB"] for e in alerts)
    assert search.purpose_of_use == "ETREAT" and search.detail["break_glass_reason"] == ed.break_glass


def test_without_a_valid_token_the_answer_is_401_with_a_challenge(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    asset = world.asset_ids["PA-01"]
    system, value = world.identifier("PA")
    paths = [f"/api/v1/photos?patient={system}|{value}", f"/api/v1/photos/{asset}", f"/api/v1/photos/{asset}/image"]
    now = datetime.now(timezone.utc)
    other_key = ec.generate_private_key(ec.SECP256R1())
    claims = {"sub": "x", "role": "medical-illustration", "iss": "clinphoto-dev", "exp": now + timedelta(hours=1)}
    forged = jwt.encode(claims, other_key, algorithm="ES256")
    hs256 = jwt.encode(claims, "secret" * 8, algorithm="HS256")
    expired = token_for(gw, role="medical-illustration", minutes=-10)
    for path in paths:
        for headers, error in (
            ({}, None),
            ({"Authorization": "Basic dXNlcjpwdw=="}, None),
            ({"Authorization": "Bearer not-a-jwt"}, "invalid_token"),
            ({"Authorization": f"Bearer {forged}"}, "invalid_token"),
            ({"Authorization": f"Bearer {hs256}"}, "invalid_token"),
            ({"Authorization": f"Bearer {expired}"}, "invalid_token"),
        ):
            r = api.get(path, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="clinphoto"')
            if error:
                assert f'error="{error}"' in challenge
    assert api.get("/healthz").status_code == 200 and api.get("/readyz").status_code == 200
    # every refused request is on the trail (User Authentication failures), one record each, missing tokens too
    failures = audit_events(gw, AuditEvent.type_code == audit.LOGIN)
    assert len(failures) == 6 * len(paths) and all(e.outcome == audit.MINOR_FAILURE and e.agent_network == "127.0.0.1" for e in failures)
    assert any("expired" in e.outcome_desc for e in failures)
    assert sum(e.outcome_desc == "no bearer token" for e in failures) == 2 * len(paths)


def test_bad_requests_get_specific_errors(gw, api):
    headers = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    assert "required" in api.get("/api/v1/photos", headers=headers).json()["detail"]
    r = api.get("/api/v1/photos", params={"patient": "MA0001"}, headers=headers)
    assert r.status_code == 400 and "system|value" in r.json()["detail"]
    r = api.get("/api/v1/photos", params={"patient": "urn:x|1"}, headers={**headers, "X-Purpose-Of-Use": "SHOPPING"})
    assert r.status_code == 400 and "SHOPPING" in r.json()["detail"]
    r = api.get("/api/v1/photos", params={"patient": "urn:x|1", "limit": 0}, headers=headers)
    assert r.status_code == 422
    r = api.get("/api/v1/photos/abc/image", params={"rendition": "huge"}, headers=headers)
    assert r.status_code == 422
    # an unknown patient is an empty page, like a patient whose photos are all hidden
    r = api.get("/api/v1/photos", params={"patient": "nhs|9449305552"}, headers=headers)
    assert r.status_code == 200 and r.json()["total"] == 0 and r.json()["items"] == []
    # a system no patient has is a mistake, not an unknown patient
    r = api.get("/api/v1/photos", params={"patient": "urn:x|1"}, headers=headers)
    assert r.status_code == 400 and "unknown identifier system" in r.json()["detail"]
    r = api.get("/api/v1/photos", params={"patient": "nhs|1234567890"}, headers=headers)
    assert r.status_code == 400 and "not a valid NHS number" in r.json()["detail"]


def test_list_narrowed_to_one_body_site_for_comparison(gw, api):
    world = build_access_matrix(gw, with_blobs=False)
    with gw.db.write() as session:
        from store.models import Asset

        for key in ("PA-01", "PA-02"):
            row = session.get(Asset, world.asset_ids[key])
            row.body_site_code, row.laterality = "7569003", "left"  # finger structure
        session.get(Asset, world.asset_ids["PA-03"]).body_site_code = "7569003"
    mi = next(u for u in USERS if u.key == "illustration")
    system, value = world.identifier("PA")
    params = {"patient": f"{system}|{value}", "site": "7569003"}
    body = api.get("/api/v1/photos", params=params, headers=world.headers(gw, mi)).json()
    assert {i["id"] for i in body["items"]} == {world.asset_ids[k] for k in ("PA-01", "PA-02", "PA-03")} and body["total"] == 3
    body = api.get("/api/v1/photos", params={**params, "laterality": "left"}, headers=world.headers(gw, mi)).json()
    assert body["total"] == 2 and all(i["bodySite"]["laterality"] == "left" for i in body["items"])
    plastics = next(u for u in USERS if u.key == "plastics")
    body = api.get("/api/v1/photos", params=params, headers=world.headers(gw, plastics)).json()
    assert {i["id"] for i in body["items"]} == {world.asset_ids["PA-02"]} and body["total"] == 1


def test_read_only_and_search_only_scopes(gw, api):
    world = build_access_matrix(gw)
    mi = next(u for u in USERS if u.key == "illustration")
    system, value = world.identifier("PA")
    photo = world.asset_ids["PA-01"]
    read_only = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="user/Media.r")
    search_only = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="user/Media.s")
    listing = {"patient": f"{system}|{value}"}
    refused = api.get("/api/v1/photos", params=listing, headers=read_only)
    assert refused.status_code == 403 and 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert api.get(f"/api/v1/photos/{photo}", headers=read_only).status_code == 200
    assert api.get(f"/api/v1/photos/{photo}/image", headers=read_only).status_code == 200
    assert api.get("/api/v1/photos", params=listing, headers=search_only).json()["total"] == len(world.visible_asset_ids(mi, "PA"))
    assert api.get(f"/api/v1/photos/{photo}", headers=search_only).status_code == 404
