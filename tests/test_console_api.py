"""The console's JSON over a real socket, on both backends: who may call each endpoint, that every view and change
is audited, the session cookie and its CSRF token, reprocessing after a mapping fix, filters and keyset paging,
counters by SQL, the outbox's retry and cancel, and no patient name or NHS number in the logs."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from sqlalchemy import update

from gateway.core.operations import HSYSADMIN
from gateway.http.session import SessionCookies, session_key
from store import audit
from store.models import Asset, OutboxItem
from tests.auth_helpers import auth_headers, token_for
from tests.console_world import (
    A01,
    BAD_VERSION,
    PHI,
    PI_TYPED,
    console_records,
    dead_outbox_item,
    fix_mapping,
    last_seq,
    mapping_that_misses_pi,
    receive,
    sign_in,
)
from tests.test_photos_api import live_server

GETS = ["/console/api/messages", "/console/api/messages/{mid}", "/console/api/counters", "/console/api/mapping",
        "/console/api/peers", "/console/api/outbox", "/console/api/audit", "/console/api/audit/verify"]
POSTS = ["/console/api/messages/{mid}/reprocess", "/console/api/bench", "/console/api/outbox/{oid}/retry",
         "/console/api/outbox/{oid}/cancel"]
# the audit subtype each endpoint leaves (the audit listing is itself recorded as an audit search)
SUBTYPES = {"/console/api/messages": "console-messages", "/console/api/messages/{mid}": "console-message",
            "/console/api/counters": "console-counters", "/console/api/mapping": "console-mapping",
            "/console/api/peers": "console-dicom-peers", "/console/api/outbox": "console-outbox",
            "/console/api/audit": "audit-search", "/console/api/audit/verify": "console-audit-verify",
            "/console/api/messages/{mid}/reprocess": "console-reprocess", "/console/api/bench": "console-mapping-test",
            "/console/api/outbox/{oid}/retry": "console-outbox-retry", "/console/api/outbox/{oid}/cancel": "console-outbox-cancel"}


@pytest.fixture
def world(gw, fx, tmp_path):
    mapping = mapping_that_misses_pi(gw, tmp_path)
    results = receive(gw, A01, PI_TYPED, BAD_VERSION)
    assert [r.status for r in results] == ["applied", "error", "rejected"]
    item = dead_outbox_item(gw, fx, tmp_path)
    return {"mapping": mapping, "ids": [r.message_id for r in results], "outbox": item.id}


@pytest.fixture
def server(gw, world):
    with live_server(gw) as client:
        yield client


def _url(path: str, world: dict) -> str:
    return path.format(mid=world["ids"][1], oid=world["outbox"])


def _post(client: httpx.Client, path: str, world: dict, **kw) -> httpx.Response:
    body = {"json": {"message": A01.decode()}} if path.endswith("/bench") else {}
    return client.post(_url(path, world), **body, **kw)


def test_every_endpoint_refuses_the_unauthenticated_and_roles_outside_the_console(gw, world, server):
    for path in GETS + POSTS:
        send = server.get if path in GETS else (lambda url, **kw: server.post(url, json={"message": "MSH|"}, **kw))
        before = last_seq(gw)
        r = send(_url(path, world))
        assert r.status_code == 401, (path, r.text)
        [record] = console_records(gw, before)
        assert record.type_code == audit.LOGIN and record.outcome == audit.MINOR_FAILURE, path
        for role in ("clinician", "medical-illustration", "privacy-officer", "educator"):
            before = last_seq(gw)
            r = send(_url(path, world), headers=auth_headers(gw, role=role, sub=f"{role}.x", specialties=["330"]))
            assert r.status_code == 403 and "may use the console" in r.json()["detail"], (path, role, r.text)
            [record] = console_records(gw, before)
            assert (record.subtype, record.outcome, record.agent_who) == ("refused", audit.MINOR_FAILURE, f"{role}.x")
    # a clinician cannot get a console session either
    r = sign_in(server, gw, role="clinician", sub="dr.derm", specialties=["330"])
    assert r.status_code == 403 and "set-cookie" not in r.headers


@pytest.mark.parametrize("role", ["integration-engineer", "admin"])
def test_console_roles_use_every_endpoint_and_each_call_is_audited(gw, world, server, role):
    headers = auth_headers(gw, role=role, sub=f"{role}.on.call")  # a bearer caller (a script) needs no CSRF token
    for path in GETS + POSTS:
        before = last_seq(gw)
        r = server.get(_url(path, world), headers=headers) if path in GETS else _post(server, path, world, headers=headers)
        if path.endswith("/cancel"):
            assert r.status_code == 200, (path, r.text)  # after the retry just before: pending, so it may be cancelled
        else:
            assert r.status_code == 200, (path, r.text)
        records = console_records(gw, before)
        mine = [e for e in records if e.agent_who == f"{role}.on.call"]
        assert [e.subtype for e in mine][-1] == SUBTYPES[path], (path, [e.subtype for e in mine])
        if SUBTYPES[path].startswith("console-"):
            assert mine[-1].purpose_of_use == HSYSADMIN and mine[-1].agent_role == role
    # reading a raw message is a read of that patient's record
    r = server.get(f"/console/api/messages/{world['ids'][0]}", headers=headers)
    assert r.status_code == 200 and "SMITH" in r.json()["raw"]
    read = [e for e in console_records(gw) if e.subtype == "console-message"][-1]
    assert read.type_code == audit.PATIENT_RECORD and read.patient_id is not None
    assert r.json()["patient"] and r.json()["ack"] == "AA"


def test_session_cookie_csrf_and_expiry(gw, world, server, caplog):
    caplog.set_level(logging.DEBUG)
    token = token_for(gw, role="integration-engineer", sub="ie.sam", minutes=5)
    r = server.post("/console/session", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert 0 < max_age <= 300  # the token's five minutes, not the session's twenty
    assert token not in cookie and token not in r.text
    csrf = r.json()["csrf"]
    assert server.get("/console/session").json()["sub"] == "ie.sam"
    assert server.get("/console/api/messages").status_code == 200

    # a change under the cookie needs the session's CSRF token, and a page of this origin
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": csrf, "Origin": "https://evil.example"}):
        before = last_seq(gw)
        r = server.post(f"/console/api/messages/{world['ids'][1]}/reprocess", headers=headers)
        assert r.status_code == 403 and "CSRF" in r.json()["detail"], headers
        [record] = console_records(gw, before)
        assert record.outcome == audit.MINOR_FAILURE and "CSRF" in record.outcome_desc
    r = server.post(f"/console/api/messages/{world['ids'][1]}/reprocess",
                    headers={"X-CSRF-Token": csrf, "Origin": str(server.base_url).rstrip("/")})
    assert r.status_code == 200, r.text

    # another session's token does not fit this one
    other = httpx.Client(base_url=server.base_url)
    other_csrf = sign_in(other, gw, sub="ie.other").json()["csrf"]
    assert server.post("/console/api/bench", json={"message": "MSH|"}, headers={"X-CSRF-Token": other_csrf}).status_code == 403

    # altered, forged, expired or another door's cookie: no session
    value = server.cookies.get("clinphoto_console")
    payload, _, mac = value.partition(".")
    cookies = SessionCookies(session_key(gw.settings), name="clinphoto_console", path="/console", audience="console")
    flipped = ("y" if mac[0] == "x" else "x") + mac[1:]  # a MAC that begins with x already would not be altered
    for bad in (payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac, payload + "." + flipped, "nonsense"):
        assert httpx.get(f"{str(server.base_url).rstrip('/')}/console/api/messages", cookies={"clinphoto_console": bad}).status_code == 401
    viewer = SessionCookies(session_key(gw.settings), name="clinphoto_console", path="/console", audience="viewer")
    ours = cookies.read(_request_with(value))
    assert ours is not None and ours.sub == "ie.sam" and viewer.read(_request_with(value)) is None
    cookies.seconds = -1
    expired = _set_cookie_value(cookies, gw)
    assert httpx.get(f"{str(server.base_url).rstrip('/')}/console/api/messages", cookies={"clinphoto_console": expired}).status_code == 401

    r = server.post("/console/session/end", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and "Max-Age=0" in r.headers["set-cookie"]
    assert server.get("/console/api/messages").status_code == 401
    # the token never reached a log line
    assert token not in caplog.text
    kinds = [e.subtype for e in console_records(gw) if e.agent_who == "ie.sam"]
    assert "console-sign-in" in kinds and "console-sign-out" in kinds


def _request_with(cookie: str):
    from starlette.requests import Request

    return Request({"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", f"clinphoto_console={cookie}".encode())]})


def _set_cookie_value(cookies: SessionCookies, gw) -> str:
    from starlette.requests import Request
    from starlette.responses import Response

    from gateway.core.identity import Subject

    response = Response()
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "scheme": "http", "server": ("x", 80),
                       "query_string": b""})
    cookies.issue(response, request, Subject(sub="ie.late", role="integration-engineer"))
    return response.headers["set-cookie"].split(";")[0].split("=", 1)[1]


def test_reprocess_after_the_mapping_is_fixed(gw, world, server, caplog):
    caplog.set_level(logging.INFO)
    assert sign_in(server, gw).status_code == 200
    csrf = server.get("/console/session").json()["csrf"]
    failed = world["ids"][1]
    r = server.get(f"/console/api/messages/{failed}")
    body = r.json()
    assert body["status"] == "error" and body["ack"] == "AE" and "101 PID-3: no usable patient identifier" in body["error"]
    assert "FIRSTPI" in body["raw"] and "MSA|AE|PI-1" in body["ackText"]
    assert body["mapped"]["ok"] is False

    r = server.post(f"/console/api/messages/{failed}/reprocess", headers={"X-CSRF-Token": csrf})
    assert r.json() == {"id": failed, "previousStatus": "error", "status": "error", "ackCode": "AE",
                        "error": "101 PID-3: no usable patient identifier in PID-3 under mapping 'nhs-england'"}
    fix_mapping(world["mapping"])
    assert server.get("/console/api/mapping").json()["valid"] is True
    assert server.post("/console/api/bench", json={"message": PI_TYPED.decode()},
                       headers={"X-CSRF-Token": csrf}).json()["report"]["status"] == "would be applied"
    r = server.post(f"/console/api/messages/{failed}/reprocess", headers={"X-CSRF-Token": csrf})
    assert r.json() == {"id": failed, "previousStatus": "error", "status": "applied", "ackCode": "AA", "error": None}
    body = server.get(f"/console/api/messages/{failed}").json()
    assert body["status"] == "applied" and body["ack"] == "AA" and body["patient"]
    records = [e for e in console_records(gw) if e.subtype == "console-reprocess"]
    assert [e.outcome_desc for e in records] == ["error -> error (AE)", "error -> applied (AA)"]
    assert records[-1].patient_id is not None and records[-1].action == "U"
    # the change itself is on the trail too, in the same transaction as the operator's action
    assert any(e.type_code == audit.PATIENT_RECORD and e.patient_id == records[-1].patient_id and e.seq < records[-1].seq
               and e.subtype != "console-message" for e in console_records(gw))
    assert server.post("/console/api/messages/999999/reprocess", headers={"X-CSRF-Token": csrf}).status_code == 404
    # a mapping that does not validate: nothing applied, said why
    world["mapping"].write_text("name: broken\nidentifiers: 3\n")
    check = server.get("/console/api/mapping").json()
    assert check["valid"] is False and check["problems"]
    r = server.post(f"/console/api/messages/{world['ids'][2]}/reprocess", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and "does not validate" in r.json()["detail"]
    assert server.get("/console/api/audit/verify").json()["ok"] is True
    for secret in PHI:  # the raw message went to the page, never to a log line at INFO or above
        assert secret not in caplog.text


def test_filters_and_keyset_paging(gw, world, server):
    headers = auth_headers(gw, role="integration-engineer", sub="ie.pat")
    more = receive(gw, *(A01.replace(b"A01-0001", f"P-{n}".encode()) for n in range(5)))
    assert all(r.status == "applied" for r in more)

    def ids(**params) -> list[int]:
        r = server.get("/console/api/messages", params=params, headers=headers)
        assert r.status_code == 200, r.text
        return [m["id"] for m in r.json()["items"]]

    everything = ids(count=200)
    assert everything == sorted(everything, reverse=True) and len(everything) == 8
    seen, before = [], None
    while True:
        params = {"count": 3, **({"before": before} if before else {})}
        page = server.get("/console/api/messages", params=params, headers=headers).json()
        seen += [m["id"] for m in page["items"]]
        before = page["nextBefore"]
        if before is None:
            break
    assert seen == everything
    assert ids(status="error") == [world["ids"][1]]
    assert ids(status=["error", "rejected"]) == [world["ids"][2], world["ids"][1]]
    assert ids(type="ADT^A28") == [world["ids"][1]] and len(ids(type="ADT")) == 8 and ids(type="ORU") == []
    assert ids(controlId="P-3") == [more[3].message_id]
    now = datetime.now(timezone.utc)
    assert len(ids(**{"from": (now - timedelta(hours=1)).isoformat()})) == 8
    assert ids(**{"to": (now - timedelta(hours=1)).isoformat()}) == []
    for bad in ({"status": "eror"}, {"type": "ADT^A01; DROP"}, {"from": "yesterday"}, {"count": 0}):
        assert server.get("/console/api/messages", params=bad, headers=headers).status_code == 400, bad
    # the list carries no patient data: that stays in the raw text, read one message at a time
    listing = server.get("/console/api/messages", params={"count": 200}, headers=headers).text
    assert not any(secret in listing for secret in PHI)


def test_counters_come_from_the_store(gw, world, server):
    headers = auth_headers(gw, role="admin", sub="admin.kim")
    server.get("/api/v1/photos", params={"patient": "nhs|9990000018"}, headers=auth_headers(gw, role="researcher"))
    c = server.get("/console/api/counters", params={"minutes": 5}, headers=headers).json()
    by_status: dict[str, int] = {}
    for per in c["messages"].values():
        for status, n in per.items():
            by_status[status] = by_status.get(status, 0) + n
    assert by_status == {"applied": 1, "error": 1, "rejected": 1} == c["totals"]
    assert sum(c["uploads"].values()) == 1  # the routed photo
    assert sum(c["refusals"].values()) >= 1  # the researcher refused photos (and the failed sends, if any)
    assert c["renditions"] == {"due": 1, "failed": 0}  # the routed photo came as a DICOM object: not rendered yet
    with gw.db.write() as s:  # as if its pixels had not decoded after the answer
        s.execute(update(Asset).values(rendition_state="failed"))
    assert server.get("/console/api/counters", headers=headers).json()["renditions"] == {"due": 0, "failed": 1}
    # another process's app sees the same figures: nothing is kept in memory
    with live_server(gw) as second:
        assert second.get("/console/api/counters", params={"minutes": 5}, headers=headers).json()["totals"] == c["totals"]


def test_outbox_retry_and_cancel(gw, world, server):
    assert sign_in(server, gw, role="admin", sub="admin.lee").status_code == 200
    csrf = server.get("/console/session").json()["csrf"]
    oid = world["outbox"]
    items = server.get("/console/api/outbox", params={"status": "dead"}).json()["items"]
    assert [(i["id"], i["destination"], i["status"]) for i in items] == [(oid, "PACS1", "dead")]
    assert items[0]["lastError"] and items[0]["photo"]
    peers = server.get("/console/api/peers").json()["peers"]
    assert [(p["aeTitle"], p["name"], p["routes"][0]["specialties"]) for p in peers] == [("PACS1", "Main PACS", ["330"])]
    r = server.post(f"/console/api/outbox/{oid}/retry", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    with gw.db.read() as s:
        item = s.get(OutboxItem, oid)
        assert (item.status, item.attempts) == ("pending", 0)
    r = server.post(f"/console/api/outbox/{oid}/retry", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and "pending" in r.json()["detail"]
    assert server.post(f"/console/api/outbox/{oid}/cancel", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert server.get("/console/api/outbox", params={"status": "cancelled"}).json()["items"][0]["id"] == oid
    assert server.post("/console/api/outbox/424242/cancel", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert server.get("/console/api/outbox", params={"status": "lost"}).status_code == 400
    changes = [(e.subtype, e.outcome) for e in console_records(gw) if e.agent_who == "admin.lee" and e.action == "U"]
    assert changes == [("console-outbox-retry", "0"), ("console-outbox-cancel", "0")]


def test_no_image_and_nothing_of_the_page_from_elsewhere(gw, world, server):
    page = server.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and "http://" not in page.text and "https://" not in page.text
    for asset in ("/console/static/console.js", "/console/static/console.css"):
        text = server.get(asset).text
        assert "http://" not in text and "https://" not in text and "localStorage" not in text and "sessionStorage" not in text
    headers = auth_headers(gw, role="integration-engineer")
    for path in GETS:
        r = server.get(_url(path, world), headers=headers)
        assert r.headers["content-type"] == "application/json" and r.headers["cache-control"] == "no-store"
    # the console's roles see no photo through any door
    assert server.get("/api/v1/photos", params={"patient": "nhs|9990000018"}, headers=headers).status_code == 403
