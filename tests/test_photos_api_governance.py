"""Medical illustration staff set who sees a photo: access list and sensitivity, effective at once, audited."""

from __future__ import annotations

from store import audit
from store.models import AuditEvent
from tests.access_matrix import USERS, build_access_matrix
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api, audit_events  # noqa: F401 (live-server fixture)


def user(key):
    return next(u for u in USERS if u.key == key)


def test_access_list_grants_and_revokes_a_very_restricted_photo(gw, api):  # noqa: F811
    world = build_access_matrix(gw)
    v_photo = world.asset_ids["PA-05"]  # V, uploaded by dr.derm, named: dr.named
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")  # default scopes user/*.cruds
    plastics = world.headers(gw, user("plastics"))
    assert api.get(f"/api/v1/photos/{v_photo}", headers=plastics).status_code == 404
    assert api.get(f"/api/v1/photos/{v_photo}", headers=mi).status_code == 404  # MI manage V photos, they do not see them

    listed = api.get(f"/api/v1/photos/{v_photo}/access", headers=mi)
    assert listed.status_code == 200 and [s["subject"] for s in listed.json()["subjects"]] == ["dr.named"]
    r = api.put(f"/api/v1/photos/{v_photo}/access/dr.plastics", headers=mi)
    assert r.status_code == 201 and [s["subject"] for s in r.json()["subjects"]] == ["dr.named", "dr.plastics"]
    assert api.put(f"/api/v1/photos/{v_photo}/access/dr.plastics", headers=mi).status_code == 200  # already there
    assert api.get(f"/api/v1/photos/{v_photo}", headers=plastics).status_code == 200
    assert api.get(f"/api/v1/photos/{v_photo}/image", headers=plastics).status_code == 200

    assert api.delete(f"/api/v1/photos/{v_photo}/access/dr.plastics", headers=mi).status_code == 204
    assert api.get(f"/api/v1/photos/{v_photo}", headers=plastics).status_code == 404
    r = api.delete(f"/api/v1/photos/{v_photo}/access/dr.plastics", headers=mi)
    assert r.status_code == 404 and "not on this photo's access list" in r.json()["detail"]

    changes = audit_events(gw, AuditEvent.subtype == "access-list", AuditEvent.action.in_(["C", "D"]))
    assert [(e.action, e.detail["subject"], e.agent_who) for e in changes] == [("C", "dr.plastics", "mi.jones"), ("D", "dr.plastics", "mi.jones")]
    assert all(e.type_code == audit.PATIENT_RECORD and e.patient_id == world.patient_ids["PA"] for e in changes)


def test_reclassifying_a_photo_changes_who_sees_it_at_once(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    photo = world.asset_ids["PA-01"]  # N, dermatology, teaching consent
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")  # default scopes user/*.cruds
    educator = world.headers(gw, user("educator"))
    derm = world.headers(gw, user("derm"))
    assert api.get(f"/api/v1/photos/{photo}", headers=educator).status_code == 200
    r = api.put(f"/api/v1/photos/{photo}/sensitivity", json={"sensitivity": "R"}, headers=mi)
    assert r.status_code == 200 and r.json() == {"id": photo, "sensitivity": "R"}
    assert api.get(f"/api/v1/photos/{photo}", headers=educator).status_code == 404
    assert api.get(f"/api/v1/photos/{photo}", headers=derm).json()["sensitivity"] == "R"
    assert api.put(f"/api/v1/photos/{photo}/sensitivity", json={"sensitivity": "X"}, headers=mi).status_code == 422
    [change] = audit_events(gw, AuditEvent.subtype == "sensitivity")
    assert change.detail == {"from": "N", "to": "R"} and change.action == "U"


def test_only_governance_roles_with_update_scope_may_change_visibility(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    photo = world.asset_ids["PA-05"]
    derm = world.headers(gw, user("derm"))  # the uploader, but not medical illustration
    r = api.put(f"/api/v1/photos/{photo}/access/dr.x", headers=derm)
    assert r.status_code == 403 and "may change who sees" in r.json()["detail"]
    read_only = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="user/Media.rs")
    r = api.put(f"/api/v1/photos/{photo}/sensitivity", json={"sensitivity": "N"}, headers=read_only)
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")  # default scopes user/*.cruds
    assert api.put("/api/v1/photos/" + "0" * 32 + "/access/dr.x", headers=mi).json() == {"detail": "photo not found"}
    assert api.get("/api/v1/photos/" + "0" * 32 + "/access", headers=mi).status_code == 404
    assert api.put(f"/api/v1/photos/{photo}/access/dr.x").status_code == 401
