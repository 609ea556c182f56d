"""The access matrix through gateway/core/policy/rules.py directly: the SQL filter and decide() on every pair."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway.core.policy.rules import decide, visible_assets_filter
from store.models import Asset
from tests.access_matrix import PEERS, PHOTOS, USERS, build_access_matrix, expected_visible

pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


def test_matrix_is_a_real_matrix():
    """Enough callers and photos, and neither all-visible nor all-hidden, so the matrix can find leaks."""
    assert len(USERS) >= 10 and len(PHOTOS) >= 40
    cells = [(u.key, p.key) for u in USERS for p in PHOTOS if expected_visible(u, p)]
    assert 0.1 < len(cells) / (len(USERS) * len(PHOTOS)) < 0.6
    assert sum(1 for u in USERS if any(expected_visible(u, p) for p in PHOTOS)) >= 12
    # every sensitivity is visible to someone and hidden from someone
    for level in "NRV":
        photos = [p for p in PHOTOS if p.sensitivity == level]
        assert any(expected_visible(u, p) for u in USERS for p in photos)
        assert any(not expected_visible(u, p) for u in USERS for p in photos)


def test_policy_matches_matrix(gw):
    world = build_access_matrix(gw, with_blobs=False)
    policy = gw.settings.policy
    problems = []
    with gw.db.read() as session:
        for user in USERS + PEERS:
            subject = world.subject(user)
            where = visible_assets_filter(subject, settings=policy)
            got = set(session.scalars(select(Asset.id).where(where)))
            want = world.visible_asset_ids(user)
            for asset_id in got - want:
                problems.append(f"LEAK {user.key} sees {world.asset_keys[asset_id]}")
            for asset_id in want - got:
                problems.append(f"MISS {user.key} does not see {world.asset_keys[asset_id]}")
            for photo in PHOTOS:
                decision = decide(session, subject, world.asset_ids[photo.key], settings=policy)
                if decision.permit != expected_visible(user, photo):
                    problems.append(f"decide {user.key} x {photo.key}: {decision.permit}: {decision.reasons}")
    assert not problems, "\n".join(problems)


def test_photo_only_specialty_setting_hides_encounter_matches(gw):
    world = build_access_matrix(gw, with_blobs=False)
    policy = gw.settings.policy.model_copy(update={"specialty_match": "photo-only"})
    derm = next(u for u in USERS if u.key == "derm")
    with gw.db.read() as session:
        got = {world.asset_keys[a] for a in session.scalars(select(Asset.id).where(visible_assets_filter(world.subject(derm), settings=policy)))}
    # PA-02 (160) and PA-06 (no specialty) were visible only through the current dermatology encounter
    assert "PA-02" in world.visible_keys(derm) and "PA-06" in world.visible_keys(derm)
    assert "PA-02" not in got and "PA-06" not in got
    assert {k for k in world.visible_keys(derm) if next(p for p in PHOTOS if p.key == k).specialty == "330"} <= got


def test_clinical_exemption_setting(gw):
    world = build_access_matrix(gw, with_blobs=False)
    derm = next(u for u in USERS if u.key == "derm")
    policy = gw.settings.policy.model_copy(update={"treat_without_consent": True})
    with gw.db.read() as session:
        got = {world.asset_keys[a] for a in session.scalars(select(Asset.id).where(visible_assets_filter(world.subject(derm), settings=policy)))}
    # PE-03 and PF-02 have no consent at all: hidden by default, visible under the exemption
    assert not {"PE-03", "PF-02"} & world.visible_keys(derm)
    assert {"PE-03", "PF-02"} <= got


def test_break_glass_can_be_configured_to_open_v(gw):
    world = build_access_matrix(gw, with_blobs=False)
    ed = next(u for u in USERS if u.key == "ed-breakglass")
    policy = gw.settings.policy.model_copy(update={"break_glass_allows_very_restricted": True})
    with gw.db.read() as session:
        got = {world.asset_keys[a] for a in session.scalars(select(Asset.id).where(visible_assets_filter(world.subject(ed), settings=policy)))}
    assert not any(k.startswith("PA-05") for k in world.visible_keys(ed))
    assert "PA-05" in got


def test_dicom_peers_from_settings_see_their_part_of_the_matrix(gw):
    from gateway.core.identity import DicomPeerRejected, authenticate_dicom_peer
    from tests.access_matrix import dicom_peers

    world = build_access_matrix(gw, with_blobs=False)
    gw.settings.auth.dicom_peers = dicom_peers("127.0.0.1")
    problems = []
    with gw.db.read() as session:
        for peer in PEERS:
            subject = authenticate_dicom_peer(gw.settings, peer.sub, "127.0.0.1", called_ae=gw.settings.ae_title)
            got = session.scalars(select(Asset.id).where(visible_assets_filter(subject, settings=gw.settings.policy)))
            problems += world.problems(peer, got, door="peer")
    assert not problems, "\n".join(problems)
    with pytest.raises(DicomPeerRejected):
        authenticate_dicom_peer(gw.settings, PEERS[0].sub, "127.0.0.2")


def test_peers_are_named_on_access_lists_with_the_ae_prefix(gw):
    """ae:PACS_ALL on a V photo opens it to that peer; a bare PACS_DERM entry is a user's name and opens nothing to the peer."""
    world = build_access_matrix(gw, with_blobs=False)
    pacs_all, pacs_derm = (next(p for p in PEERS if p.key == k) for k in ("pacs-all", "pacs-derm"))
    assert "PD-04" in world.visible_keys(pacs_all) and "PB-05" not in world.visible_keys(pacs_derm)
    with gw.db.read() as session:
        for peer, key, want in ((pacs_all, "PD-04", True), (pacs_derm, "PB-05", False)):
            subject = world.subject(peer)
            got = session.scalars(
                select(Asset.id).where(Asset.id == world.asset_ids[key], visible_assets_filter(subject, settings=gw.settings.policy))
            ).all()
            assert bool(got) == want == decide(session, subject, world.asset_ids[key], settings=gw.settings.policy).permit
