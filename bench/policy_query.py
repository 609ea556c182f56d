"""How fast is a policy-filtered query? Prints median / p95 milliseconds.

    .venv/bin/python bench/policy_query.py [--patients 2000] [--per-patient 25] [--url postgresql+psycopg://...]

Builds a store of synthetic patients, encounters, consents and photos (mixed
sensitivities and specialties), then times, for a clinician:
- one patient's photo list: count + first page of 50, newest first (REST/FHIR/QIDO shape);
- one photo by id (the read/retrieve shape);
- everything the clinician may see across the store (a count; the worst case).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, insert, select  # noqa: E402

from gateway.core.identity import Subject  # noqa: E402
from gateway.core.policy.rules import visible_assets_filter  # noqa: E402
from gateway.core.policy.settings import PolicySettings  # noqa: E402
from store.db import Database  # noqa: E402
from store.migrate import upgrade  # noqa: E402
from store.models import Asset, AssetAccess, Consent, ConsentAsset, Encounter, Patient  # noqa: E402

SPECIALTIES = ["100", "160", "161", "330", "420"]


def seed(db: Database, patients: int, per_patient: int) -> list[tuple[int, str]]:
    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    samples = []
    with db.write() as session:
        session.execute(insert(Patient), [{"family_name": f"P{i}"} for i in range(patients)])
        ids = list(session.scalars(select(Patient.id).order_by(Patient.id)))
        session.execute(insert(Encounter), [
            {"patient_id": p, "visit_number": f"V{p}", "specialty": rng.choice(SPECIALTIES),
             "status": rng.choice(["in-progress", "finished"]), "visit_system": "B"} for p in ids
        ])
        consents = []
        for p in ids:
            if rng.random() < 0.9:
                consents.append({"id": uuid.uuid4().hex, "patient_id": p, "level": rng.choice(["record", "teaching", "publication"]),
                                 "given_by": "patient", "status": rng.choice(["active"] * 9 + ["withdrawn"]), "scope": "patient",
                                 "withdrawn_at": now - timedelta(days=5)})
        session.execute(insert(Consent), consents)
        rows, access, photo_consents, links = [], [], [], []
        for p in ids:
            for _ in range(per_patient):
                aid = uuid.uuid4().hex
                rows.append({
                    "id": aid, "patient_id": p, "study_uid": f"2.25.{p}", "series_uid": f"2.25.{p}.1",
                    "sop_instance_uid": f"2.25.{uuid.uuid4().int}", "sha256": uuid.uuid4().hex * 2, "size": 1, "media_type": "image/jpeg",
                    "source": "upload", "specialty": rng.choice(SPECIALTIES), "sensitivity": rng.choice("NNNNNNRRV"),
                    "uploaded_by": rng.choice(["mi.jones", "dr.derm", "dr.x"]), "status": "active",
                    "taken_at": now - timedelta(days=rng.randint(0, 900)), "created_at": now - timedelta(days=rng.randint(0, 900)),
                })
                if rng.random() < 0.02:
                    access.append({"asset_id": aid, "subject": "dr.derm"})
                if rng.random() < 0.5:  # consent captured with the photo at upload, linked as the pipeline does
                    cid = uuid.uuid4().hex
                    photo_consents.append({"id": cid, "patient_id": p, "level": rng.choice(["record", "teaching"]),
                                           "given_by": "patient", "status": "active", "scope": "photos"})
                    links.append({"consent_id": cid, "asset_id": aid})
            samples.append((p, rows[-1]["id"]))
            if len(rows) >= 20000:
                session.execute(insert(Asset), rows)
                rows = []
        if rows:
            session.execute(insert(Asset), rows)
        if access:
            session.execute(insert(AssetAccess), access)
        session.execute(insert(Consent), photo_consents)
        session.execute(insert(ConsentAsset), links)
    return samples


def timed(fn, n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--per-patient", type=int, default=25)
    ap.add_argument("--url", default=None, help="database URL (default: a SQLite file in a temp folder); use an empty database")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    db = Database(args.url or f"sqlite:///{tmp}/bench.db")
    upgrade(db)
    t = time.perf_counter()
    samples = seed(db, args.patients, args.per_patient)
    total = args.patients * args.per_patient
    print(f"{db.dialect}: {args.patients} patients, {total} photos seeded in {time.perf_counter() - t:.1f} s")
    with db.engine.connect() as conn:  # planner statistics, as a live database has them
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    policy = PolicySettings()
    derm = Subject(sub="dr.derm", role="clinician", specialties=("330",), scopes=("user/Media.rs",))
    rng = random.Random(1)

    def patient_page():
        pid, _ = rng.choice(samples)
        where = visible_assets_filter(derm, settings=policy)
        with db.read() as s:
            s.scalar(select(func.count()).select_from(Asset).where(Asset.patient_id == pid, where))
            s.scalars(select(Asset).where(Asset.patient_id == pid, where)
                      .order_by(func.coalesce(Asset.taken_at, Asset.created_at).desc(), Asset.id.desc()).limit(50)).all()

    def one_photo():
        _, aid = rng.choice(samples)
        with db.read() as s:
            s.scalars(select(Asset).where(Asset.id == aid, visible_assets_filter(derm, settings=policy))).first()

    def everything():
        with db.read() as s:
            return s.scalar(select(func.count()).select_from(Asset).where(visible_assets_filter(derm, settings=policy)))

    for name, fn, n in (("patient list (count + page of 50)", patient_page, 300), ("one photo by id", one_photo, 300),
                        ("count of all visible photos", everything, 10)):
        med, p95 = timed(fn, n)
        print(f"{name:38s} median {med:7.2f} ms   p95 {p95:7.2f} ms")
    print(f"clinician 330 may see {everything()} of {total} photos")


if __name__ == "__main__":
    main()
