"""The policy filter built once per subject and purpose (rules.FILTERS): the same rows as a filter built afresh,
and a cached filter still sees the store and the clock change (its current-encounter time is bound when it runs)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from gateway.core.identity import Subject
from gateway.core.policy import rules
from gateway.core.policy.rules import FILTERS, AccessContext, filter_for, resolve
from gateway.core.policy.settings import PolicySettings
from store.models import Asset, AssetAccess, Consent, Encounter, Patient
from tests.access_matrix import PEERS, USERS, build_access_matrix

PURPOSES = ("TREAT", "TRAIN", "HRESCH", "PUBLISH", "ETREAT")


def visible(db, where) -> set[str]:
    with db.read() as s:
        return set(s.scalars(select(Asset.id).where(where)))


def test_cached_filter_gives_the_rows_of_a_fresh_one(gw):
    build_access_matrix(gw, with_blobs=False)
    policy = gw.settings.policy
    FILTERS.clear()
    checked = 0
    for user in USERS + PEERS:
        subject = Subject(sub=user.sub, role=user.role, specialties=user.specialties, scopes=user.scopes,
                          sensitivities=user.sensitivities, break_glass_reason=user.break_glass)
        for purpose in {user.purpose, *PURPOSES}:
            reason = user.break_glass if purpose == "ETREAT" else None
            # resolved afresh for each use: a request is for the current time only within NOW_SLACK of it (2 s),
            # which a loaded CI machine can outlast between two statements of this loop
            def ctx() -> AccessContext:
                return resolve(subject, policy, purpose=purpose, break_glass=reason)  # noqa: B023

            fresh = rules._build_filter(ctx(), policy, Asset, frozenset(), now_at_run=False)
            cached = filter_for(ctx(), policy)
            assert filter_for(ctx(), policy) is cached  # built once
            assert visible(gw.db, cached) == visible(gw.db, fresh), (user.key, purpose)
            for skip in (("consent",), ("consent", "sensitivity")):
                assert visible(gw.db, filter_for(ctx(), policy, skip=skip)) == visible(
                    gw.db, rules._build_filter(ctx(), policy, Asset, frozenset(skip), now_at_run=False)), (user.key, skip)
            checked += 1
    assert checked > 40 and FILTERS.hits >= checked


def test_a_dicom_peer_and_a_user_of_the_same_sub_get_filters_of_their_own(gw):
    """Access lists name a DICOM peer ae:AETITLE and a user by their sub: the cached filter of one is not the other's
    (a token whose sub is a peer's AE title saw the peer's listed photos after the peer's filter was cached)."""
    from gateway.core.identity import PeerPermissions

    policy = gw.settings.policy
    user = Subject(sub="PACSDERM", role="system", scopes=("system/*.rs",))
    peer = Subject(sub="PACSDERM", role="system", scopes=("system/*.rs",), peer=PeerPermissions(ae_title="PACSDERM"))
    FILTERS.clear()
    as_user = filter_for(resolve(user, policy), policy)
    assert filter_for(resolve(peer, policy), policy) is not as_user
    assert rules.access_list_name(peer) == "ae:PACSDERM" != rules.access_list_name(user)


def _encounter_world(db, discharged_at: datetime | None) -> tuple[str, int]:
    """An N photo of specialty 420 whose patient has a dermatology (330) encounter in progress: a dermatologist
    sees it through the encounter only."""
    with db.write() as s:
        patient = Patient(family_name="ENC")
        s.add(patient)
        s.flush()
        s.add(Encounter(patient_id=patient.id, visit_system="T", visit_number="E1", specialty="330",
                        status="in-progress", discharged_at=discharged_at))
        s.add(Consent(patient_id=patient.id, level="record", given_by="patient", scope="patient"))
        asset = Asset(patient_id=patient.id, study_uid="1.2", series_uid="1.2.1", sop_instance_uid="1.2.1.1",
                      sha256="a" * 64, size=1, media_type="image/jpeg", source="upload", specialty="420", sensitivity="N")
        s.add(asset)
        s.flush()
        return asset.id, patient.id


DERM = Subject(sub="dr.derm", role="clinician", specialties=("330",), scopes=("user/Media.rs",))


def test_a_cached_filter_sees_an_encounter_end(db):
    asset_id, patient_id = _encounter_world(db, None)
    policy = PolicySettings()
    where = filter_for(resolve(DERM, policy), policy)
    assert visible(db, where) == {asset_id}
    with db.write() as s:
        s.execute(update(Encounter).where(Encounter.patient_id == patient_id).values(status="finished"))
    assert filter_for(resolve(DERM, policy), policy) is where
    assert visible(db, where) == set()


def test_a_cached_filter_does_not_freeze_the_time(db):
    """Discharged a moment from now: seen now, no longer seen once that moment has passed, by the same filter."""
    # seconds ahead that a loaded machine's database writes and first query cannot use up
    asset_id, _patient_id = _encounter_world(db, datetime.now(timezone.utc) + timedelta(seconds=4))
    policy = PolicySettings()
    where = filter_for(resolve(DERM, policy), policy)
    assert visible(db, where) == {asset_id}
    time.sleep(4.1)
    assert filter_for(resolve(DERM, policy), policy) is where
    assert visible(db, where) == set()


def test_a_request_for_another_time_is_built_for_that_time(db):
    asset_id, _patient_id = _encounter_world(db, datetime.now(timezone.utc) + timedelta(hours=1))
    policy = PolicySettings()
    later = resolve(DERM, policy, now=datetime.now(timezone.utc) + timedelta(hours=2))
    assert visible(db, filter_for(later, policy)) == set()  # discharged by then
    assert visible(db, filter_for(resolve(DERM, policy), policy)) == {asset_id}


def test_settings_and_subjects_have_their_own_filters(db):
    with db.write() as s:
        patient = Patient(family_name="V")
        s.add(patient)
        s.flush()
        s.add(Consent(patient_id=patient.id, level="record", given_by="patient", scope="patient"))
        asset = Asset(patient_id=patient.id, study_uid="1.3", series_uid="1.3.1", sop_instance_uid="1.3.1.1",
                      sha256="b" * 64, size=1, media_type="image/jpeg", source="upload", specialty="330", sensitivity="V",
                      uploaded_by="mi.jones")
        s.add(asset)
        s.flush()
        s.add(AssetAccess(asset_id=asset.id, subject="dr.derm", granted_by="mi.jones"))
        asset_id = asset.id
    policy = PolicySettings()
    other = Subject(sub="dr.other", role="clinician", specialties=("330",), scopes=("user/Media.rs",))
    assert visible(db, filter_for(resolve(DERM, policy), policy)) == {asset_id}  # on the access list
    assert visible(db, filter_for(resolve(other, policy), policy)) == set()
    policy.visible_statuses = ["quarantined"]  # changed in place: the cached filter must not be served
    assert visible(db, filter_for(resolve(DERM, policy), policy)) == set()


@pytest.mark.parametrize("backend", ["postgresql"])  # generic plans are PostgreSQL's
def test_the_generic_plan_probes_the_access_list_and_encounters_per_photo(gw):
    """psycopg prepares a statement after five runs and PostgreSQL may then settle on a generic plan, which hashed
    a sequential scan of asset_access for every list (rules._probe). Whatever the plan, those two EXISTS stay
    per-photo probes."""
    import re

    from sqlalchemy import func

    world = build_access_matrix(gw, with_blobs=False)
    policy = gw.settings.policy
    where = filter_for(resolve(DERM, policy, interaction="search"), policy)
    query = (select(Asset.id).where(Asset.patient_id == world.patient_ids["PA"], where)
             .order_by(func.coalesce(Asset.taken_at, Asset.created_at).desc()).limit(50))
    compiled = query.compile(dialect=gw.db.engine.dialect, compile_kwargs={"render_postcompile": True})
    names: list[str] = []
    sql = re.sub(r"%\((\w+)\)s", lambda m: names.append(m.group(1)) or f"${len(names)}", str(compiled))
    with gw.db.engine.connect() as conn:
        cur = conn.connection.dbapi_connection.cursor()
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute("PREPARE policy_list AS " + sql)
        from psycopg import sql as psql

        args = ", ".join(psql.Literal(compiled.params[n]).as_string(cur) for n in names)
        cur.execute(f"EXPLAIN (COSTS OFF) EXECUTE policy_list({args})")
        plan = [r[0] for r in cur.fetchall()]
        conn.rollback()
    hashed = {int(n) for line in plan for n in re.findall(r"hashed SubPlan (\d+)", line)}
    read_by: dict[int, str] = {}  # subplan number -> the first relation its plan reads
    current = None
    for line in plan:
        if m := re.match(r"\s*SubPlan (\d+)", line):
            current = int(m.group(1))
        elif current is not None and (m := re.search(r" on (\w+)", line)) and current not in read_by:
            read_by[current] = m.group(1)
    probed = {read_by[n] for n in read_by if n not in hashed}
    assert {"asset_access", "encounters"} <= probed, plan
    assert not {read_by.get(n) for n in hashed} & {"asset_access", "encounters"}, plan


@pytest.mark.parametrize("backend", ["postgresql"])  # EXPLAIN ANALYZE's loops
def test_a_study_date_range_puts_only_the_photos_of_studies_taken_then_through_the_policy(gw):
    """StudyDate is the study's (its first visible photo's), matched after grouping: without the photos first narrowed
    to the studies with one taken in the range, every photo in the store went through the policy filter, whatever
    the range (PostgreSQL, 3,600 photos: a date range without a patient key 23 -> 547 ms, growing with the store)."""
    import re
    from datetime import date

    from sqlalchemy import event

    from gateway.core import study_query
    from gateway.core.study_query import DateRange, StudyQuery

    base = datetime(2024, 1, 1, 9, tzinfo=timezone.utc)
    with gw.db.write() as s:
        for p in range(20):
            patient = Patient(family_name=f"F{p}", given_names="G")
            s.add(patient)
            s.flush()
            s.add(Consent(patient_id=patient.id, level="record", given_by="patient"))
            for n in range(10):  # one study a patient, one photo a day; patient 0's taken in the range asked
                s.add(Asset(patient_id=patient.id, study_uid=f"1.9.{p}", series_uid=f"1.9.{p}.1", sop_instance_uid=f"1.9.{p}.1.{n}",
                            sha256=f"{p:032d}{n:032d}", size=1, media_type="image/jpeg", source="upload",
                            taken_at=base + timedelta(days=(0 if p == 0 else 100) + n)))
    ctx = resolve(Subject(sub="mi.jones", role="medical-illustration", scopes=("user/Media.rs",)), gw.settings.policy,
                  interaction="search")
    for level in ("STUDY", "SERIES", "IMAGE"):
        seen: list[tuple[str, object]] = []

        def grab(_conn, _cursor, statement, parameters, _context, _many, seen=seen):
            seen.append((statement, parameters))

        event.listen(gw.db.engine, "before_cursor_execute", grab)
        try:
            matches, _ = study_query.search(gw, ctx, StudyQuery(level=level, study_date=DateRange(date(2024, 1, 1), date(2024, 1, 20))))
        finally:
            event.remove(gw.db.engine, "before_cursor_execute", grab)
        assert {m.study_uid for m in matches} == {"1.9.0"}
        statement, parameters = seen[0]
        with gw.db.engine.connect() as conn:
            cur = conn.connection.dbapi_connection.cursor()
            cur.execute("EXPLAIN ANALYZE " + statement, parameters)
            plan = [r[0] for r in cur.fetchall()]
        # the policy's probes (consents, asset_access) run once a photo they filter: the range's 10, not the store's 200
        probes = [int(m.group(1)) for line in plan if re.search(r" on (consents|asset_access)\b", line)
                  for m in [re.search(r"loops=(\d+)", line)] if m]
        assert probes and max(probes) <= 10, (level, "\n".join(plan))
