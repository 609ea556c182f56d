"""The access matrix through QIDO-RS and WADO-RS, both backends: every caller searches all instances and retrieves
every photo (instance, metadata, thumbnail); zero leaks, zero misses; a hidden instance is answered exactly like an
absent one; every object retrieved passes dciodvfy."""

from __future__ import annotations

import io

import pydicom
from sqlalchemy import select

from gateway.app import create_app
from gateway.core.policy.rules import scope_allows
from store.models import Asset, AuditEvent
from tests.access_matrix import PHOTOS, USERS, build_access_matrix
from tests.conftest import require_tool
from tests.ingest_helpers import dicom_tools_check
from tests.test_dicom_retrieve import with_dicom_objects
from tests.test_dicomweb import DICOM_TS_ANY, parts, value
from tests.test_photos_api import refused_outright, serving


def test_the_access_matrix_through_qido_and_wado(gw, tmp_path):
    require_tool("dciodvfy", "dicom3tools")
    world = build_access_matrix(gw)
    sop_of = with_dicom_objects(gw, tmp_path)
    asset_of = {sop: a for a, sop in sop_of.items()}
    with gw.db.read() as s:
        uids = {a: (st, se) for a, st, se in s.execute(select(Asset.id, Asset.study_uid, Asset.series_uid))}
    problems: list[str] = []
    checked: set[str] = set()
    with serving(create_app(gw)) as web:
        for user in USERS:
            headers = world.headers(gw, user)
            r = web.get("/dicomweb/instances", params={"limit": 1000}, headers=headers)
            if refused_outright(user) or not scope_allows(user.scopes, "Media", "s"):
                assert r.status_code == 403, (user.key, r.text)
            else:
                assert r.status_code == 200, (user.key, r.text)
                got = {asset_of[value(i, "00080018")] for i in r.json()}
                problems += world.problems(user, got, door="QIDO-RS")
                # study level counts only what the caller may see
                studies = web.get("/dicomweb/studies", params={"limit": 1000}, headers=headers).json()
                assert sum(value(s, "00201208") for s in studies) == len(got), user.key
            may_read = not refused_outright(user) and scope_allows(user.scopes, "Media", "r")
            seen = set()
            for photo in PHOTOS:
                asset_id = world.asset_ids[photo.key]
                study, series = uids[asset_id]
                url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop_of[asset_id]}"
                instance = web.get(url, headers={**headers, "Accept": DICOM_TS_ANY})
                meta = web.get(f"{url}/metadata", headers=headers)
                thumb = web.get(f"{url}/thumbnail", headers=headers)
                statuses = {instance.status_code, meta.status_code, thumb.status_code}
                if not may_read:
                    assert statuses == {403}, (user.key, photo.key, statuses)
                    continue
                if statuses == {200}:
                    seen.add(asset_id)
                    if asset_id not in checked:  # each object through dciodvfy once
                        [(_, body)] = parts(instance)
                        assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == sop_of[asset_id]
                        path = tmp_path / f"{asset_id}.dcm"
                        path.write_bytes(body)
                        dicom_tools_check(path, iod=True)
                        checked.add(asset_id)
                elif statuses == {404}:
                    # hidden and absent alike: the same answer as for a UID nobody stored
                    absent = web.get(f"/dicomweb/studies/{study}/series/{series}/instances/2.25.1", headers={**headers, "Accept": DICOM_TS_ANY})
                    assert absent.status_code == 404 and absent.json() == instance.json()
                else:
                    problems.append(f"WADO-RS: {user.key} {photo.key} answered {statuses}")
            if may_read:
                problems += world.problems(user, seen, door="WADO-RS")
    assert not problems, "\n".join(problems)
    assert checked  # at least the illustrators retrieved objects
    with gw.db.read() as s:
        channels = {e.get("channel") for entities in s.scalars(select(AuditEvent.entities).where(AuditEvent.type_code == "110112"))
                    for e in entities if e.get("type") == "query"}
    assert "dicomweb" in channels

