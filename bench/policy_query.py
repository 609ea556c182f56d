"""How fast is a policy-filtered query as the store grows? p50 / p95 milliseconds, SQLite and PostgreSQL.

    .venv/bin/python bench/policy_query.py                                   # SQLite, 10k / 200k / 1M photos
    .venv/bin/python bench/policy_query.py --postgres-url postgresql+psycopg://clinphoto:clinphoto@127.0.0.1:5432/clinphoto_test
    .venv/bin/python bench/policy_query.py --sizes 10000,200000 --no-sqlite --postgres-url ...

For each size and backend it seeds a store of synthetic patients (25 photos each), encounters, consents
(patient-wide and captured with photos, linked) and access lists, mixed sensitivities and specialties, in bulk
(PostgreSQL: COPY; SQLite: executemany in one transaction), says how long that took, then times for a
dermatologist:
- the patient list: count + first page of 50, newest first, the policy filter inside (the REST/FHIR/QIDO shape);
- one photo by id with the policy filter (the read/retrieve shape);
- anchors, in the same run: the same two statements without the policy filter. Machines here are noisy: read
  the ratios to the anchors, not the absolute times;
- optionally (--count) everything the clinician may see across the store (a count; the worst case, no reader's
  path).
On PostgreSQL the list also runs with psycopg's prepared statements past their generic-plan switch, and the
generic plan (plan_cache_mode = force_generic_plan) is checked for sequential scans and hashed subplans.
Each PostgreSQL store is a schema of its own in the given database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from gateway.core.identity import Subject  # noqa: E402
from gateway.core.policy.rules import filter_for, resolve  # noqa: E402
from gateway.core.policy.settings import PolicySettings  # noqa: E402
from store.db import Database  # noqa: E402
from store.migrate import upgrade  # noqa: E402
from store.models import Asset  # noqa: E402

SPECIALTIES = ["100", "160", "161", "330", "420"]
PER_PATIENT = 25
DERM = Subject(sub="dr.derm", role="clinician", specialties=("330",), scopes=("user/Media.rs",))

ASSET_COLUMNS = ("id", "patient_id", "filed_patient_id", "study_uid", "series_uid", "sop_instance_uid", "sop_class_uid",
                 "sha256", "size", "media_type", "original_kept", "source", "specialty", "sensitivity", "uploaded_by",
                 "status", "taken_at", "created_at", "updated_at")
CONSENT_COLUMNS = ("id", "patient_id", "level", "given_by", "status", "withdrawn_at", "scope", "created_at", "updated_at")


# -- the synthetic store, as rows ------------------------------------------------------------------------


class Rows:
    """Every row of a store of `photos` photos, `per_patient` each, made once per size (both backends get the same
    store). bench/fhir_search.py reuses it with 10 per patient."""

    def __init__(self, photos: int, seed: int = 7, per_patient: int = PER_PATIENT) -> None:
        rng = random.Random(seed)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        n_patients = max(1, photos // per_patient)
        self.patients = [(p, f"P{p}", now, now) for p in range(1, n_patients + 1)]
        self.encounters = [(p, p, "B", f"V{p}", rng.choice(SPECIALTIES), rng.choice(["in-progress", "finished"]), now, now)
                           for p in range(1, n_patients + 1)]
        self.consents: list[tuple[Any, ...]] = []
        self.links: list[tuple[str, str, datetime]] = []
        self.access: list[tuple[str, str, datetime]] = []
        self.assets: list[tuple[Any, ...]] = []
        self.samples: list[tuple[int, str]] = []  # (patient id, one of its photo ids)
        for p in range(1, n_patients + 1):
            if rng.random() < 0.9:
                self.consents.append((uuid.uuid4().hex, p, rng.choice(["record", "teaching", "publication"]), "patient",
                                      rng.choice(["active"] * 9 + ["withdrawn"]), now - timedelta(days=5), "patient", now, now))
            for _ in range(per_patient):
                aid = uuid.uuid4().hex
                created = now - timedelta(days=rng.randint(0, 900))
                self.assets.append((
                    aid, p, p, f"2.25.{p}", f"2.25.{p}.1", f"2.25.{uuid.uuid4().int}", "1.2.840.10008.5.1.4.1.1.77.1.4",
                    uuid.uuid4().hex * 2, 1, "image/jpeg", True, "upload", rng.choice(SPECIALTIES), rng.choice("NNNNNNRRV"),
                    rng.choice(["mi.jones", "dr.derm", "dr.x"]), "active", now - timedelta(days=rng.randint(0, 900)), created, created))
                if rng.random() < 0.02:
                    self.access.append((aid, "dr.derm", now))
                if rng.random() < 0.5:  # consent captured with the photo at upload, linked as the pipeline does
                    cid = uuid.uuid4().hex
                    self.consents.append((cid, p, rng.choice(["record", "teaching"]), "patient", "active", None, "photos", now, now))
                    self.links.append((cid, aid, now))
            self.samples.append((p, self.assets[-1][0]))

    def tables(self) -> Iterator[tuple[str, tuple[str, ...], list[tuple[Any, ...]]]]:
        yield "patients", ("id", "family_name", "created_at", "updated_at"), self.patients
        yield "encounters", ("id", "patient_id", "visit_system", "visit_number", "specialty", "status", "created_at",
                             "updated_at"), self.encounters
        yield "consents", CONSENT_COLUMNS, self.consents
        yield "assets", ASSET_COLUMNS, self.assets
        yield "consent_assets", ("consent_id", "asset_id", "created_at"), self.links
        yield "asset_access", ("asset_id", "subject", "created_at"), self.access


def seed_postgres(db: Database, rows: Rows) -> None:
    """COPY each table (~10x faster than multi-row INSERTs here) with the plain indexes dropped and built again
    after (one sorted build each instead of a million random inserts), then the sequences past the ids used."""
    with db.engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        cur = raw.cursor()
        cur.execute("SET maintenance_work_mem = '256MB'")
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                    "AND indexname NOT IN (SELECT conname FROM pg_constraint)")
        indexes = cur.fetchall()
        for name, _definition in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        for table, columns, data in rows.tables():
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in data:
                    copy.write_row(row)
        for _name, definition in indexes:
            cur.execute(definition)
        for table in ("patients", "encounters"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        raw.commit()  # the driver's own transaction: SQLAlchemy did not begin one, its commit() would do nothing


def seed_sqlite(db: Database, rows: Rows) -> None:
    """executemany in one transaction (one durable commit), with a page cache big enough for the random-key
    indexes (the default 2 MB made 1M photos take ~100 s)."""
    def sqlite_value(v: Any) -> Any:
        return v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v

    with db.engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        raw.execute("PRAGMA cache_size = -1000000")  # 1 GB, this connection only
        raw.execute("BEGIN")
        for table, columns, data in rows.tables():
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            raw.executemany(sql, ([sqlite_value(v) for v in row] for row in data))
        raw.execute("COMMIT")


# -- timing ---------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)]


def newest_first() -> tuple[Any, Any]:
    return func.coalesce(Asset.taken_at, Asset.created_at).desc(), Asset.id.desc()


def measure(db: Database, rows: Rows, runs: int, count: bool) -> dict[str, tuple[float, float]]:
    policy = PolicySettings()
    rng = random.Random(1)
    out: dict[str, tuple[float, float]] = {}

    def patient_list(policed: bool) -> Callable[[], object]:
        def run() -> object:
            pid, _ = rng.choice(rows.samples)
            # as gateway.core.access.search does: the request resolved, its filter inside both statements
            scope = [Asset.patient_id == pid]
            if policed:
                scope.append(filter_for(resolve(DERM, policy, interaction="search"), policy))
            with db.read() as s:
                s.scalar(select(func.count()).select_from(Asset).where(*scope))
                return s.scalars(select(Asset).where(*scope).order_by(*newest_first()).limit(50)).all()
        return run

    def one_photo(policed: bool) -> Callable[[], object]:
        def run() -> object:
            _, aid = rng.choice(rows.samples)
            scope = [Asset.id == aid]
            if policed:
                scope.append(filter_for(resolve(DERM, policy, interaction="read"), policy))
            with db.read() as s:
                return s.scalars(select(Asset).where(*scope)).first()
        return run

    timed(patient_list(True), 20)  # warm-up: connections, statement caches, prepared statements
    timed(one_photo(True), 20)
    out["list"] = timed(patient_list(True), runs)
    out["list anchor"] = timed(patient_list(False), runs)
    out["photo"] = timed(one_photo(True), runs)
    out["photo anchor"] = timed(one_photo(False), runs)
    if count:
        def everything() -> object:
            with db.read() as s:
                return s.scalar(select(func.count()).select_from(Asset).where(filter_for(resolve(DERM, policy), policy)))
        out["count all"] = timed(everything, 3)
    return out


def generic_plan(db: Database, rows: Rows) -> str:
    """What PostgreSQL's generic plan of the patient list reads: 'index probes only' or the offending nodes."""
    policy = PolicySettings()
    where = filter_for(resolve(DERM, policy, interaction="search"), policy)
    query = select(Asset.id).where(Asset.patient_id == rows.samples[0][0], where).order_by(*newest_first()).limit(50)
    compiled = query.compile(dialect=db.engine.dialect, compile_kwargs={"render_postcompile": True})
    names: list[str] = []

    def number(match: Any) -> str:
        names.append(match.group(1))
        return f"${len(names)}"

    import re

    sql = re.sub(r"%\((\w+)\)s", number, str(compiled))
    params = compiled.params
    with db.engine.connect() as conn:
        cur = conn.connection.dbapi_connection.cursor()
        cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute("PREPARE bench_list AS " + sql)
        from psycopg import sql as psql

        args = ", ".join(psql.Literal(params[n]).as_string(cur) for n in names)
        cur.execute(f"EXPLAIN (COSTS OFF) EXECUTE bench_list({args})")
        plan = [r[0] for r in cur.fetchall()]
        conn.rollback()
    hashed = any("hashed SubPlan" in line for line in plan)
    outer = next((line.strip() for line in plan if " on assets" in line), "?")
    # a sequential scan inside a per-photo probe is the planner's choice for a table of a few pages
    scans = sorted({line.split("Seq Scan on ")[1].split()[0] for line in plan if "Seq Scan on " in line})
    return (f"{'HASHED SUBPLAN' if hashed else 'no hashed subplan'}; {outer.removeprefix('->').strip()[:45]}"
            + (f"; probes by seq scan of small {', '.join(scans)}" if scans else ""))


# -- stores ----------------------------------------------------------------------------------------------------


class PgSchema:
    """A schema of its own in the given database, dropped afterwards (the URL's search_path points into it)."""

    def __init__(self, url: str) -> None:
        self.name = f"bench_{uuid.uuid4().hex[:10]}"
        self.admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.name}"'))
        self.url = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{self.name}" CASCADE'))
        self.admin.dispose()


def seed(db: Database, rows: Rows) -> float:
    """The rows into a migrated, empty store, checked and analysed; the seconds the seeding took."""
    t = time.perf_counter()
    (seed_postgres if db.dialect == "postgresql" else seed_sqlite)(db, rows)
    seeded = time.perf_counter() - t
    with db.engine.connect() as conn:  # planner statistics, as a live database has them
        stored = conn.exec_driver_sql("SELECT count(*) FROM assets").scalar()
        if stored != len(rows.assets):
            raise SystemExit(f"{db.dialect}: {stored} photos stored, {len(rows.assets)} seeded")
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    return seeded


def run_backend(name: str, url: str, rows: Rows, args: argparse.Namespace) -> dict[str, Any]:
    db = Database(url)
    try:
        upgrade(db)
        seeded = seed(db, rows)
        result: dict[str, Any] = {"backend": name, "seed_s": seeded, **measure(db, rows, args.runs, args.count)}
        if db.dialect == "postgresql":
            result["plan"] = generic_plan(db, rows)
        return result
    finally:
        db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,200000,1000000", help="photos per store, comma-separated")
    ap.add_argument("--postgres-url", help="a PostgreSQL database to make one schema per store in (dropped after)")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--runs", type=int, default=300, help="timed calls per figure")
    ap.add_argument("--count", action="store_true", help="also the count over the whole store (slow at 1M)")
    args = ap.parse_args()
    print(f"{'photos':>8} {'backend':>10} {'seed s':>7} {'list p50':>9} {'p95':>6} {'anchor p50':>11} {'p95':>6} "
          f"{'ratio':>6} {'photo p50':>10} {'anchor':>7}{'  count all':>12}  generic plan (PostgreSQL)")
    for size in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        rows = Rows(size)
        made = time.perf_counter() - t
        backends: list[tuple[str, Callable[[], tuple[str, Callable[[], None]]]]] = []
        if not args.no_sqlite:
            tmp = tempfile.mkdtemp(prefix="clinphoto-policy-")
            backends.append(("sqlite", lambda tmp=tmp: (f"sqlite:///{tmp}/bench.db", lambda: None)))
        if args.postgres_url:
            def pg() -> tuple[str, Callable[[], None]]:
                schema = PgSchema(args.postgres_url)
                return schema.url, schema.drop
            backends.append(("postgresql", pg))
        for name, make in backends:
            url, cleanup = make()
            try:
                r = run_backend(name, url, rows, args)
            finally:
                cleanup()
            lp50, lp95 = r["list"]
            ap50, ap95 = r["list anchor"]
            count = f"{r['count all'][0]:10.0f} ms" if "count all" in r else ""
            print(f"{size:>8} {name:>10} {r['seed_s']:>7.1f} {lp50:>9.2f} {lp95:>6.2f} {ap50:>11.2f} {ap95:>6.2f} "
                  f"{lp50 / ap50:>6.2f} {r['photo'][0]:>10.2f} {r['photo anchor'][0]:>7.2f}{count:>12}  {r.get('plan', '')}",
                  flush=True)
        print(f"{'':>8} (rows for {size} photos made in {made:.1f} s, not counted in seeding)", flush=True)
    print("milliseconds; anchor = the same statements without the policy filter; ratio = list p50 / anchor p50")


if __name__ == "__main__":
    main()
