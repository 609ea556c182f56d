"""Policy rules one by one, with the consent service: decisions, reasons, and the query they compile to."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.orm import aliased

from gateway.core.consents import ConsentError, list_consents, record_consent, withdraw_consent
from gateway.core.identity import Subject
from gateway.core.policy.rules import check_request, decide, resolve, visible_assets_filter
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Asset, AuditEvent, Encounter, Patient

DERM = Subject(sub="dr.derm", role="clinician", specialties=("330",), scopes=("user/Media.rs",))
EDU = Subject(sub="ed.teacher", role="educator", scopes=("user/Media.rs",), purpose_of_use="TRAIN")
MI = Subject(sub="mi.jones", role="medical-illustration", scopes=("user/Media.rs",))


def add_patient(session) -> Patient:
    patient = Patient(family_name="TEST")
    session.add(patient)
    session.flush()
    return patient


def add_asset(session, patient, **kw) -> Asset:
    uid = uuid.uuid4()
    values = dict(patient_id=patient.id, study_uid="2.25.1", series_uid="2.25.2", sop_instance_uid=f"2.25.{uid.int}",
                  sha256=uid.hex * 2, size=1, media_type="image/jpeg", source="upload", specialty="330", sensitivity="N",
                  uploaded_by="mi.jones")
    values.update(kw)
    asset = Asset(**values)
    session.add(asset)
    session.flush()
    return asset


def visible(session, subject, policy, **kw) -> set[str]:
    return set(session.scalars(select(Asset.id).where(visible_assets_filter(subject, settings=policy, **kw))))


def test_withdrawal_ends_teaching_at_once_but_care_stays(gw):
    policy = gw.settings.policy
    with gw.db.write() as session:
        patient = add_patient(session)
        old = add_asset(session, patient, created_at=datetime.now(timezone.utc) - timedelta(days=3))
        consent = record_consent(session, patient_id=patient.id, level="teaching", given_by="patient", captured_by="mi.jones")
    with gw.db.read() as session:
        assert visible(session, EDU, policy) == {old.id} and visible(session, DERM, policy) == {old.id}
        assert decide(session, EDU, old.id, settings=policy).permit
    with gw.db.write() as session:
        withdraw_consent(session, consent.id, withdrawn_by="mi.jones")
    with gw.db.write() as session:
        new = add_asset(session, session.get(Patient, patient.id))
    with gw.db.read() as session:
        assert visible(session, EDU, policy) == set()  # teaching ends at once, for the existing photo too
        assert visible(session, DERM, policy) == {old.id}  # care keeps the photo taken before the withdrawal
        decision = decide(session, EDU, old.id, settings=policy)
        assert not decision.permit and decision.denied_by == ["consent"]
        assert any("no active publication/teaching consent" in r for r in decision.reasons)
        assert not decide(session, DERM, new.id, settings=policy).permit  # stored after: no consent at all
        audit_rows = session.scalars(select(AuditEvent).where(AuditEvent.subtype == "consent").order_by(AuditEvent.seq)).all()
        assert [e.action for e in audit_rows] == ["C", "U"] and audit_rows[1].detail["status"] == "withdrawn"
        assert [c.status for c in list_consents(session, patient.id)] == ["withdrawn"]
        assert list_consents(session, patient.id, include_withdrawn=False) == []


def test_consent_service_refuses_what_the_rules_do_not_allow(gw):
    with gw.db.write() as session:
        patient, other = add_patient(session), add_patient(session)
        theirs = add_asset(session, other)
        enc = Encounter(patient_id=other.id, visit_number="V1", specialty="330")
        session.add(enc)
        session.flush()
        ids = (patient.id, theirs.id, enc.id)
    cases = [
        (dict(level="teaching", given_by="best-interests"), "record only"),
        (dict(level="publication", given_by="patient"), "specific use"),
        (dict(level="gold", given_by="patient"), "unknown consent level"),
        (dict(level="record", given_by="neighbour"), "unknown given_by"),
        (dict(level="record", given_by="patient", scope="photos"), "needs the photos"),
        (dict(level="record", given_by="patient", scope="photos", asset_ids=[ids[1]]), "not of this patient"),
        (dict(level="record", given_by="patient", scope="encounter", encounter_id=ids[2]), "encounter of this patient"),
        (dict(level="record", given_by="patient", captured_by=" "), "captured_by"),
    ]
    for kw, message in cases:
        with pytest.raises(ConsentError, match=message):
            with gw.db.write() as session:
                record_consent(session, patient_id=ids[0], **{"captured_by": "mi", **kw})
    with gw.db.read() as session:
        assert list_consents(session, ids[0]) == []  # nothing half-written
    with gw.db.write() as session:
        c = record_consent(session, patient_id=ids[0], level="record", given_by="patient", captured_by="mi")
    with gw.db.write() as session:
        withdraw_consent(session, c.id, withdrawn_by="mi")
    with pytest.raises(ConsentError, match="already withdrawn"):
        with gw.db.write() as session:
            withdraw_consent(session, c.id, withdrawn_by="mi")


def test_photo_scoped_consent_links_only_the_named_photos(gw):
    policy = gw.settings.policy
    with gw.db.write() as session:
        patient = add_patient(session)
        a, b = add_asset(session, patient), add_asset(session, patient)
        record_consent(session, patient_id=patient.id, level="publication", given_by="patient", captured_by="mi",
                       scope="photos", asset_ids=[a.id], purpose_note="BJD case report 2026")
    publisher = Subject(sub="mi.pub", role="medical-illustration", scopes=("user/Media.rs",), purpose_of_use="PUBLISH")
    with gw.db.read() as session:
        assert visible(session, publisher, policy) == {a.id}
        assert visible(session, DERM, policy) == {a.id}
        assert b.id not in visible(session, MI, policy)


def test_break_glass_rules_and_reasons(gw):
    policy = gw.settings.policy
    with gw.db.write() as session:
        patient = add_patient(session)
        record_consent(session, patient_id=patient.id, level="record", given_by="patient", captured_by="mi")
        n = add_asset(session, patient, specialty="160")
        r = add_asset(session, patient, specialty="160", sensitivity="R")
        v = add_asset(session, patient, specialty="160", sensitivity="V", uploaded_by="dr.plastics")
    ed = Subject(sub="dr.ed", role="clinician", specialties=("180",), scopes=("user/Media.rs",))
    with gw.db.read() as session:
        assert visible(session, ed, policy) == set()
        assert visible(session, ed, policy, purpose="ETREAT", break_glass="collapsed in ED") == {n.id, r.id}
        decision = decide(session, ed, r.id, settings=policy, purpose="ETREAT", break_glass="collapsed in ED")
        assert decision.permit and decision.break_glass
        assert any("break-glass lifts the specialty rule (reason: collapsed in ED)" in x for x in decision.reasons)
        denied_v = decide(session, ed, v.id, settings=policy, purpose="ETREAT", break_glass="collapsed in ED")
        assert denied_v.denied_by == ["sensitivity"]
        # no reason: refused outright, and the filter shows nothing
        assert visible(session, ed, policy, purpose="ETREAT") == set()
    with pytest.raises(Refused, match="needs a reason") as exc:
        check_request(resolve(ed, policy, purpose="ETREAT"))
    assert exc.value.kind == Kind.FORBIDDEN
    with pytest.raises(Refused, match="only allowed with purpose ETREAT") as exc:
        check_request(resolve(ed, policy, purpose="TREAT", break_glass="because"))
    assert exc.value.kind == Kind.BAD_REQUEST
    with pytest.raises(Refused, match="may not break the glass"):
        check_request(resolve(MI, policy, purpose="ETREAT", break_glass="because"))


def test_filter_is_composable_with_aliases_joins_and_counts(gw):
    """Exits build their own queries: the filter works on an alias and never multiplies rows."""
    policy = gw.settings.policy
    with gw.db.write() as session:
        patient = add_patient(session)
        for level in ("record", "teaching", "publication"):  # three consents that all apply
            record_consent(session, patient_id=patient.id, level=level, given_by="patient", captured_by="mi",
                           purpose_note="x" if level == "publication" else None)
        for _ in range(4):
            add_asset(session, patient)
    with gw.db.read() as session:
        rows = session.execute(select(Asset.id, Patient.family_name).join(Patient, Patient.id == Asset.patient_id)
                               .where(visible_assets_filter(DERM, settings=policy))).all()
        assert len(rows) == 4
        photo = aliased(Asset)
        ids = session.scalars(select(photo.id).where(visible_assets_filter(DERM, settings=policy, asset=photo))).all()
        assert len(ids) == 4
        studies = session.scalars(select(Asset.study_uid).where(visible_assets_filter(DERM, settings=policy)).distinct()).all()
        assert studies == ["2.25.1"]


def test_unknown_photo_is_denied_like_a_hidden_one(gw):
    with gw.db.read() as session:
        decision = decide(session, MI, "f" * 32, settings=gw.settings.policy)
    assert not decision.permit and decision.denied_by == ["exists"]


def test_audit_chain_still_verifies_after_policy_activity(gw):
    with gw.db.write() as session:
        patient = add_patient(session)
        record_consent(session, patient_id=patient.id, level="record", given_by="patient", captured_by="mi")
    with gw.db.read() as session:
        assert audit.verify(session).ok
