"""Medical illustration staff set who sees a photo: access list and sensitivity, effective at once, audited."""

from __future__ import annotations

from store import audit
from store.models import AuditEvent
from tests.access_matrix import USERS, build_access_matrix
from tests.auth_helpers import auth_headers
from tests.test_photos_api import api, audit_events  # noqa: F401 (live-server fixture)

# a photo that is not there, and one the caller may not see: the one error body, word for word
NOT_FOUND = {"error": "not-found", "message": "photo not found", "detail": "photo not found"}


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
    assert api.put("/api/v1/photos/" + "0" * 32 + "/access/dr.x", headers=mi).json() == NOT_FOUND
    assert api.get("/api/v1/photos/" + "0" * 32 + "/access", headers=mi).status_code == 404
    assert api.put(f"/api/v1/photos/{photo}/access/dr.x").status_code == 401


def test_governance_refusals_are_audited(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    photo = world.asset_ids["PA-05"]
    derm = world.headers(gw, user("derm"))
    read_only = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="user/Media.rs")
    assert api.put(f"/api/v1/photos/{photo}/access/dr.x", headers=derm).status_code == 403
    assert api.get(f"/api/v1/photos/{photo}/access", headers=derm).status_code == 403
    assert api.put(f"/api/v1/photos/{photo}/sensitivity", json={"sensitivity": "N"}, headers=read_only).status_code == 403
    refusals = audit_events(gw, AuditEvent.subtype == "refused")
    assert [(e.agent_who, e.outcome) for e in refusals] == [("dr.derm", audit.MINOR_FAILURE)] * 2 + [("mi.jones", audit.MINOR_FAILURE)]
    assert "may change who sees" in refusals[0].outcome_desc and "scopes" in refusals[2].outcome_desc
    assert refusals[0].entities[0]["id"] == f"PUT /api/v1/photos/{photo}/access/dr.x"


def test_access_list_does_not_reveal_whether_a_photo_exists(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    held = world.asset_ids["PA-07"]  # quarantined: no exit shows it
    other_patient = auth_headers(gw, role="medical-illustration", sub="mi.jones", scopes="patient/Media.cruds",
                                 patient=world.patient_ids["PB"])
    missing = "0" * 32
    for headers, photo in ((mi, held), (other_patient, world.asset_ids["PA-01"])):
        for method, path in (("GET", "/access"), ("PUT", "/access/dr.x"), ("DELETE", "/access/dr.x")):
            hidden = api.request(method, f"/api/v1/photos/{photo}{path}", headers=headers)
            absent = api.request(method, f"/api/v1/photos/{missing}{path}", headers=headers)
            assert hidden.status_code == absent.status_code == 404 and hidden.content == absent.content
            assert absent.json() == NOT_FOUND
        hidden = api.put(f"/api/v1/photos/{photo}/sensitivity", json={"sensitivity": "V"}, headers=headers)
        assert hidden.status_code == 404 and hidden.json() == NOT_FOUND
    with gw.db.read() as session:
        from sqlalchemy import select

        from store.models import Asset, AssetAccess

        assert session.get(Asset, held).sensitivity == "N" and not session.scalars(select(AssetAccess).where(AssetAccess.subject == "dr.x")).all()
    denials = audit_events(gw, AuditEvent.subtype == "refused")
    assert len(denials) == 2 * 7 and all(e.outcome == audit.MINOR_FAILURE for e in denials)
    assert {e.patient_id for e in denials} == {world.patient_ids["PA"], None}
    # a photo the patient/ scope covers is managed as before
    assert api.get(f"/api/v1/photos/{world.asset_ids['PB-05']}/access", headers=other_patient).status_code == 200


def test_granting_oneself_a_very_restricted_photo_raises_an_alert(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    v_photo, n_photo = world.asset_ids["PA-05"], world.asset_ids["PA-01"]
    assert api.put(f"/api/v1/photos/{n_photo}/access/mi.jones", headers=mi).status_code == 201  # N: no alert
    assert api.put(f"/api/v1/photos/{v_photo}/access/dr.other", headers=mi).status_code == 201  # someone else: no alert
    assert not audit_events(gw, AuditEvent.type_code == audit.SECURITY_ALERT)
    assert api.put(f"/api/v1/photos/{v_photo}/access/mi.jones", headers=mi).status_code == 201
    [alert] = audit_events(gw, AuditEvent.type_code == audit.SECURITY_ALERT)
    assert alert.agent_who == "mi.jones" and alert.subtype == "self-grant" and alert.patient_id == world.patient_ids["PA"]
    assert {"type": "asset", "id": v_photo} in alert.entities
    assert api.put(f"/api/v1/photos/{v_photo}/access/mi.jones", headers=mi).status_code == 200  # already there: no new alert
    assert len(audit_events(gw, AuditEvent.type_code == audit.SECURITY_ALERT)) == 1


def test_denied_break_glass_read_raises_a_security_alert(gw, api):  # noqa: F811
    world = build_access_matrix(gw, with_blobs=False)
    ed = user("ed-breakglass")
    v_photo = world.asset_ids["PA-05"]  # V: break-glass never opens it by default
    assert api.get(f"/api/v1/photos/{v_photo}", headers=world.headers(gw, ed)).status_code == 404
    [alert] = audit_events(gw, AuditEvent.type_code == audit.SECURITY_ALERT)
    assert alert.outcome == audit.MINOR_FAILURE and alert.agent_who == "dr.ed" and alert.patient_id == world.patient_ids["PA"]
    assert alert.detail["break_glass_reason"] == ed.break_glass and "sensitivity" in alert.outcome_desc
    # a denied read without break-glass raises none
    assert api.get(f"/api/v1/photos/{v_photo}", headers=world.headers(gw, user("plastics"))).status_code == 404
    assert len(audit_events(gw, AuditEvent.type_code == audit.SECURITY_ALERT)) == 1
