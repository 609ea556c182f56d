"""A photo may carry several consents (consent_assets): recording one never takes another's cover away,
and the upload pipeline and the consent API write the same link."""

from __future__ import annotations

from sqlalchemy import select

from gateway.core.consents import record_consent
from gateway.core.ingest.metadata import parse_metadata
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import ImageFile
from gateway.core.policy.rules import decide, visible_assets_filter
from store.models import Asset, ConsentAsset, PatientIdentifier
from tests.auth_helpers import auth_headers
from tests.ingest_helpers import UPLOADER, capture, photo_fixtures
from tests.ingest_helpers import add_patient as add_ingest_patient
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)
from tests.test_policy import MI, add_asset, add_patient

SYSTEM = "https://trust.example.nhs.uk/Id/mrn"
PUBLISHER = MI.__class__(sub="mi.pub", role="medical-illustration", scopes=("user/Media.rs",), purpose_of_use="PUBLISH")


def links(gw, asset_id) -> set[str]:
    with gw.db.read() as session:
        return set(session.scalars(select(ConsentAsset.consent_id).where(ConsentAsset.asset_id == asset_id)))


def test_a_second_photo_consent_keeps_the_first_ones_cover_over_rest(gw, api):  # noqa: F811
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="M7"))
        photo = add_asset(session, patient, specialty="330").id
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    derm = auth_headers(gw, role="clinician", sub="dr.derm", specialties=["330"])
    publish = auth_headers(gw, role="medical-illustration", sub="mi.pub", purpose="PUBLISH")
    listing = {"patient": f"{SYSTEM}|M7"}
    body = {"patient": f"{SYSTEM}|M7", "givenBy": "patient", "scope": "photos", "photos": [photo]}

    r = api.post("/api/v1/consents", json={**body, "level": "publication", "purposeNote": "BJD case report"}, headers=mi)
    assert r.status_code == 201, r.text
    publication = r.json()["id"]
    assert [i["id"] for i in api.get("/api/v1/photos", params=listing, headers=publish).json()["items"]] == [photo]

    r = api.post("/api/v1/consents", json={**body, "level": "record"}, headers=derm)
    assert r.status_code == 201, r.text
    record = r.json()["id"]
    # the publication consent is still active, so PUBLISH still sees the photo; care sees it through either
    assert [i["id"] for i in api.get("/api/v1/photos", params=listing, headers=publish).json()["items"]] == [photo]
    assert [i["id"] for i in api.get("/api/v1/photos", params=listing, headers=derm).json()["items"]] == [photo]
    assert api.get(f"/api/v1/photos/{photo}", headers=derm).json()["consent"]["level"] == "publication"
    assert links(gw, photo) == {publication, record}
    with gw.db.read() as session:
        assert session.get(Asset, photo).consent_id is None  # the consent API does not rewrite "captured at upload"

    # withdrawing one ends only its own cover
    assert api.post(f"/api/v1/consents/{publication}/withdraw", headers=mi).status_code == 200
    assert api.get("/api/v1/photos", params=listing, headers=publish).json()["total"] == 0
    assert api.get("/api/v1/photos", params=listing, headers=derm).json()["total"] == 1


def test_both_readings_agree_for_a_photo_with_several_consents(gw):
    policy = gw.settings.policy
    with gw.db.write() as session:
        patient = add_patient(session)
        a, b = add_asset(session, patient), add_asset(session, patient)
        record_consent(session, patient_id=patient.id, level="publication", given_by="patient", captured_by="mi",
                       scope="photos", asset_ids=[a.id], purpose_note="atlas")
        record_consent(session, patient_id=patient.id, level="record", given_by="patient", captured_by="mi",
                       scope="photos", asset_ids=[a.id, b.id, a.id])  # a photo named twice is linked once
    with gw.db.read() as session:
        by_sql = set(session.scalars(select(Asset.id).where(visible_assets_filter(PUBLISHER, settings=policy))))
        assert by_sql == {a.id}
        assert decide(session, PUBLISHER, a.id, settings=policy).permit
        assert not decide(session, PUBLISHER, b.id, settings=policy).permit
        assert set(session.scalars(select(Asset.id).where(visible_assets_filter(MI, settings=policy)))) == {a.id, b.id}


def test_upload_links_the_consent_captured_with_the_photo(gw, tmp_path):
    fx = photo_fixtures.make_all(tmp_path / "photos")
    patient = add_ingest_patient(gw)
    actor = UPLOADER
    meta = {"patient": f"nhs|{patient['nhs']}", "specialty": "330"}
    made = ingest(gw, capture([ImageFile(fx["baseline_420.jpg"])],
                  parse_metadata({**meta, "consent": {"level": "publication", "givenBy": "patient", "purpose": "atlas"}}), actor))
    asset_id = made.photos[0].asset_id
    assert links(gw, asset_id) == {made.consent_id}
    with gw.db.read() as session:
        assert session.get(Asset, asset_id).consent_id == made.consent_id
        # the link is what the policy reads: PUBLISH sees the photo through its upload consent
        assert decide(session, PUBLISHER, asset_id, settings=gw.settings.policy).permit
    # a later photo-scoped consent adds a link, the upload one stays
    with gw.db.write() as session:
        later = record_consent(session, patient_id=patient["id"], level="record", given_by="patient", captured_by="mi",
                               scope="photos", asset_ids=[asset_id])
    assert links(gw, asset_id) == {made.consent_id, later.id}
    with gw.db.read() as session:
        assert decide(session, PUBLISHER, asset_id, settings=gw.settings.policy).permit
    # consentId naming an existing consent links it too
    linked = ingest(gw, capture([ImageFile(fx["gray.jpg"])], parse_metadata({**meta, "consentId": patient["consent_id"]}), actor))
    assert links(gw, linked.photos[0].asset_id) == {patient["consent_id"]}


def test_photo_scoped_consent_for_a_photo_without_any_consent(gw, api):  # noqa: F811
    """Recording the first consent of a photo: every rule but the consent rule decides whether the caller may name it."""
    with gw.db.write() as session:
        patient = add_patient(session)
        session.add(PatientIdentifier(patient_id=patient.id, system=SYSTEM, value="M8"))
        photo = add_asset(session, patient, specialty="330").id
        restricted = add_asset(session, patient, specialty="330", sensitivity="R").id
        v_photo = add_asset(session, patient, specialty="330", sensitivity="V", uploaded_by="dr.other").id
        held = add_asset(session, patient, specialty="330", status="quarantined").id
    mi = auth_headers(gw, role="medical-illustration", sub="mi.jones")
    body = {"patient": f"{SYSTEM}|M8", "level": "record", "givenBy": "patient", "scope": "photos"}
    r = api.post("/api/v1/consents", json={**body, "photos": [photo, restricted]}, headers=mi)
    assert r.status_code == 201, r.text
    assert links(gw, photo) == links(gw, restricted) == {r.json()["id"]}
    # the other rules still hold: a V photo not theirs, a quarantined photo, another specialty's R photo
    for hidden, headers in ((v_photo, mi), (held, mi),
                            (restricted, auth_headers(gw, role="clinician", sub="dr.plastics", specialties=["160"]))):
        r = api.post("/api/v1/consents", json={**body, "photos": [hidden]}, headers=headers)
        assert r.status_code == 404 and r.json()["detail"] == f"photo not found: {hidden}"
