"""The SQL filter and the per-photo decision agree, on SQLite and PostgreSQL (hypothesis).

Each example builds a small random world (patients, encounters, consents,
photos, access lists) inside a transaction that is rolled back, then asks both
readings of the policy which photos a random subject may see.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.core.identity import Subject
from gateway.core.policy.rules import decide, visible_assets_filter
from gateway.core.policy.settings import PURPOSES, ROLES, PolicySettings
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
SPECIALTIES = ["100", "160", "330", "420"]
SUBS = ["alice", "bob", "carol", "PACS1"]
ACCESS_NAMES = SUBS + ["ae:PACS1"]  # a peer is named on access lists as ae:AETITLE

offset = st.sampled_from([-30, -2, -1, 1, 2, 30]).map(lambda d: T0 + timedelta(days=d))
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731

encounter_st = st.fixed_dictionaries({
    "patient": st.integers(0, 1),
    "specialty": maybe(st.sampled_from(SPECIALTIES)),
    "status": st.sampled_from(["in-progress", "finished", "planned", "cancelled"]),
    "discharged_at": maybe(offset),
})
consent_st = st.fixed_dictionaries({
    "patient": st.integers(0, 1),
    "level": st.sampled_from(["record", "teaching", "publication"]),
    "given_by": st.sampled_from(["patient", "parent", "best-interests"]),
    "status": st.sampled_from(["active", "active", "withdrawn"]),
    "withdrawn_at": maybe(offset),
    "scope": st.sampled_from(["patient", "patient", "encounter", "photos"]),
    "encounter": maybe(st.integers(0, 3)),
})
asset_st = st.fixed_dictionaries({
    "patient": st.integers(0, 1),
    "encounter": maybe(st.integers(0, 3)),
    "consent": maybe(st.integers(0, 4)),
    "specialty": maybe(st.sampled_from(SPECIALTIES)),
    "sensitivity": st.sampled_from(["N", "R", "V"]),
    "uploaded_by": maybe(st.sampled_from(SUBS)),
    "status": st.sampled_from(["active"] * 4 + ["quarantined", "entered-in-error"]),
    "created_at": offset,
})
world_st = st.fixed_dictionaries({
    "encounters": st.lists(encounter_st, max_size=4),
    "consents": st.lists(consent_st, min_size=1, max_size=5),
    "assets": st.lists(asset_st, min_size=1, max_size=7),
    "access": st.lists(st.tuples(st.integers(0, 6), st.sampled_from(ACCESS_NAMES)), max_size=4),
    "links": st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), max_size=4),
})
subject_st = st.builds(
    lambda role, sub, specs, scopes, patient, sens: Subject(
        sub=sub, role=role, specialties=tuple(specs), scopes=tuple(scopes), patient=patient, sensitivities=sens
    ),
    # weighted towards callers who see something, so the interesting rules run often
    role=st.sampled_from(["clinician"] * 4 + ["medical-illustration"] * 2 + list(ROLES)),
    sub=st.sampled_from(SUBS),
    specs=st.lists(st.sampled_from(SPECIALTIES), max_size=2, unique=True),
    scopes=st.sampled_from([["user/Media.rs"]] * 6 + [["system/*.rs"], ["patient/Media.rs"], ["patient/Media.rs"], ["user/Patient.rs"], [],
                            ["user/Media.c"], ["user/*.read"], ["user/Media.r"], ["user/Media.s", "patient/Media.r"],
                            ["user/Media.rs?security-label=N"], ["user/DocumentReference.rs", "user/Binary.r"]]),
    patient=st.sampled_from([None, "P0", "P1", "P9"]),
    sens=st.sampled_from([None, ("N",), ("N", "R")]),
)
policy_st = st.builds(
    PolicySettings,
    specialty_match=st.sampled_from(["photo-or-encounter", "photo-only"]),
    treat_without_consent=st.booleans(),
    break_glass_allows_very_restricted=st.booleans(),
)
request_st = st.sampled_from(["TREAT"] * 4 + ["ETREAT"] * 3 + list(PURPOSES) + ["BOGUS"]).flatmap(
    lambda purpose: st.tuples(
        st.just(purpose),
        st.sampled_from([None, "read", "search"]),
        # mostly well-formed: a reason with ETREAT, none otherwise; sometimes the wrong way round
        st.sampled_from(["cardiac arrest in ED"] * 4 + [None, ""] if purpose == "ETREAT" else [None] * 4 + ["", "cardiac arrest in ED"]),
        offset,
    )
)


def build_world(session, world) -> tuple[list[Patient], list[Asset]]:
    patients = [Patient(family_name=f"P{i}") for i in range(2)]
    session.add_all(patients)
    session.flush()
    encounters = [
        Encounter(patient_id=patients[e["patient"]].id, visit_number=uuid.uuid4().hex, specialty=e["specialty"],
                  status=e["status"], discharged_at=e["discharged_at"])
        for e in world["encounters"]
    ]
    session.add_all(encounters)
    session.flush()
    consents = []
    for c in world["consents"]:
        enc = encounters[c["encounter"]].id if c["encounter"] is not None and c["encounter"] < len(encounters) else None
        consents.append(Consent(patient_id=patients[c["patient"]].id, level=c["level"], given_by=c["given_by"],
                                status=c["status"], withdrawn_at=c["withdrawn_at"], scope=c["scope"], encounter_id=enc))
    session.add_all(consents)
    session.flush()
    assets = []
    for a in world["assets"]:
        uid = uuid.uuid4().hex
        assets.append(Asset(
            patient_id=patients[a["patient"]].id,
            encounter_id=encounters[a["encounter"]].id if a["encounter"] is not None and a["encounter"] < len(encounters) else None,
            consent_id=consents[a["consent"]].id if a["consent"] is not None and a["consent"] < len(consents) else None,
            study_uid="2.25.1", series_uid="2.25.2", sop_instance_uid=f"2.25.{int(uid, 16)}", sha256=uid * 2, size=1,
            media_type="image/jpeg", source="upload", specialty=a["specialty"], sensitivity=a["sensitivity"],
            uploaded_by=a["uploaded_by"], status=a["status"], created_at=a["created_at"],
        ))
    session.add_all(assets)
    session.flush()
    # the consent captured with a photo covers it through consent_assets (as the upload pipeline writes it),
    # plus random extra links: a photo may carry several consents
    links = {(a.consent_id, a.id) for a in assets if a.consent_id}
    links |= {(consents[c].id, assets[i].id) for i, c in world.get("links", []) if i < len(assets) and c < len(consents)}
    session.add_all([ConsentAsset(consent_id=c, asset_id=a) for c, a in links])
    session.flush()
    grants = {(assets[i].id, sub) for i, sub in world["access"] if i < len(assets)}
    session.add_all([AssetAccess(asset_id=a, subject=s) for a, s in grants])
    session.flush()
    return patients, assets


def with_patient(subject: Subject, patients: list[Patient]) -> Subject:
    """Map the symbolic patient in context (P0, P1, P9 = unknown) onto the real ids."""
    from dataclasses import replace

    if subject.patient in ("P0", "P1"):
        return replace(subject, patient=str(patients[int(subject.patient[1])].id))
    if subject.patient == "P9":
        return replace(subject, patient="999999")
    return subject


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(world=world_st, subject=subject_st, policy=policy_st, request=request_st)
def test_sql_filter_agrees_with_decision(db, world, subject, policy, request):
    purpose, interaction, break_glass, now = request
    kw = dict(settings=policy, purpose=purpose, break_glass=break_glass, now=now, interaction=interaction)
    with db.read() as session:  # everything below is rolled back
        patients, assets = build_world(session, world)
        subject = with_patient(subject, patients)
        where = visible_assets_filter(subject, **kw)
        ids = {a.id for a in assets}
        by_sql = set(session.scalars(select(Asset.id).where(Asset.id.in_(ids), where)))
        counted = session.scalar(select(func.count()).select_from(Asset).where(Asset.id.in_(ids), where))
        by_decision = set()
        for asset in assets:
            decision = decide(session, subject, asset, **kw)
            assert decision.permit == (not decision.denied_by)
            assert len(decision.reasons) >= 5
            if decision.permit:
                by_decision.add(asset.id)
        event(f"visible: {'none' if not by_sql else 'some' if by_sql != ids else 'all'}")
        assert by_sql == by_decision, {a.id: decide(session, subject, a, **kw).reasons for a in assets if (a.id in by_sql) != (a.id in by_decision)}
        assert counted == len(by_sql)


ALLOWED = {"clinician": ["TREAT", "TRAIN", "ETREAT"], "medical-illustration": ["TREAT", "TRAIN", "HRESCH", "PUBLISH"],
           "educator": ["TRAIN"], "researcher": ["HRESCH"], "system": ["TREAT"]}


@st.composite
def looking_caller(draw):
    """A caller whose request is well-formed and whose role may act for the purpose: the rules on the rows decide."""
    role = draw(st.sampled_from(list(ALLOWED)))
    purpose = draw(st.sampled_from(ALLOWED[role]))
    subject = Subject(
        sub=draw(st.sampled_from(SUBS)), role=role,
        specialties=tuple(draw(st.lists(st.sampled_from(SPECIALTIES), min_size=1, max_size=2, unique=True))),
        scopes=("user/Media.rs",), sensitivities=draw(st.sampled_from([("N",), ("N", "R")])) if role == "system" else None,
    )
    return subject, purpose, ("resus" if purpose == "ETREAT" else None)


patient_consent_st = consent_st.map(
    lambda c: {**c, "scope": "patient", "status": "active" if c["status"] == "withdrawn" and c["level"] == "record" else c["status"]}
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    world=st.fixed_dictionaries({
        "encounters": st.lists(encounter_st, max_size=4),
        "consents": st.lists(st.one_of(patient_consent_st, consent_st), min_size=2, max_size=5),
        "assets": st.lists(asset_st, min_size=2, max_size=7),
        "access": st.lists(st.tuples(st.integers(0, 6), st.sampled_from(ACCESS_NAMES)), max_size=4),
    }),
    caller=looking_caller(),
    policy=policy_st,
    now=offset,
)
def test_agreement_for_callers_allowed_to_look(db, world, caller, policy, now):
    subject, purpose, reason = caller
    kw = dict(settings=policy, purpose=purpose, break_glass=reason, now=now)
    with db.read() as session:
        _patients, assets = build_world(session, world)
        ids = {a.id for a in assets}
        by_sql = set(session.scalars(select(Asset.id).where(Asset.id.in_(ids), visible_assets_filter(subject, **kw))))
        by_decision = {a.id for a in assets if decide(session, subject, a, **kw).permit}
        event(f"visible: {'none' if not by_sql else 'some' if by_sql != ids else 'all'}")
        assert by_sql == by_decision
