"""What a C-FIND and a QIDO-RS query cost the gateway: server CPU per query (read from /proc, so other work on a
shared machine moves it far less than the latencies) and p50/p95 latency, on a store of N studies.

    .venv/bin/python bench/query_cpu.py [--studies 10000] [--runs 400] [--postgres-url URL] [--repo CHECKOUT]

The store is filled in bulk (a patient, an NHS number, a record consent and a one-photo study per patient), then
`clinphoto serve` (DICOM and HTTP only) answers, after 50 queries of warm-up, `--runs` C-FIND STUDY queries by
PatientID over one association (pynetdicom, TCP_NODELAY) and as many QIDO-RS /studies?PatientID= (httpx,
keep-alive), each for another patient. `--repo` runs another checkout's gateway on the same kind of store (e.g. the
commit before a change, for a before/after in one sitting). On PostgreSQL the store is a schema of its own in the
given database, dropped afterwards. bench/dicom_vs_orthanc.py measures the same queries beside Orthanc.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from pydicom import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # noqa: E402
from sqlalchemy import create_engine, insert, text  # noqa: E402

from bench.hl7_throughput import nhs_number  # noqa: E402
from tests.net import free_ports  # noqa: E402

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
EXPLICIT = "1.2.840.10008.1.2.1"


def seed(database_url: str, data_dir: Path, studies: int, env: dict[str, str], repo: Path) -> tuple[list[str], str]:
    """The store, made by the checkout that will serve it (its own migrations) and filled; the patients' NHS
    numbers and a dev token for QIDO-RS."""
    from gateway.core.context import Gateway
    from gateway.core.identity import mint_dev_token
    from gateway.settings import Settings
    from store.models import Asset, Consent, Patient, PatientIdentifier

    numbers: dict[str, None] = {}
    n = 0
    while len(numbers) < studies:
        numbers.setdefault(nhs_number(n), None)
        n += 1
    subprocess.run([sys.executable, "-m", "gateway.cli", "db", "upgrade"], cwd=repo, env=env, check=True, capture_output=True)
    gw = Gateway.open(Settings(data_dir=data_dir, database_url=database_url), migrate=False)
    try:
        now = datetime.now(timezone.utc)
        with gw.db.write() as s:
            conn = s.connection()
            conn.execute(insert(Patient), [{"id": i, "family_name": "BENCH", "public_id": uuid.uuid4().hex, "created_at": now,
                                            "updated_at": now} for i in range(1, studies + 1)])
            conn.execute(insert(PatientIdentifier), [{"patient_id": i, "system": NHS_SYSTEM, "value": v, "type_code": "NH",
                                                      "created_at": now} for i, v in enumerate(numbers, 1)])
            conn.execute(insert(Consent), [{"id": uuid.uuid4().hex, "patient_id": i, "level": "record", "given_by": "patient",
                                            "status": "active", "scope": "patient", "created_at": now, "updated_at": now}
                                           for i in range(1, studies + 1)])
            conn.execute(insert(Asset), [{
                "id": uuid.uuid4().hex, "patient_id": i, "filed_patient_id": i, "study_uid": f"2.25.{i}", "series_uid": f"2.25.{i}.1",
                "sop_instance_uid": f"2.25.{i}.1.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.4", "instance_number": 1,
                "sha256": uuid.uuid4().hex, "size": 100, "media_type": "application/dicom", "original_kept": True, "source": "dimse",
                "sensitivity": "N", "status": "active", "uploaded_by": "ae:BENCH", "taken_at": now - timedelta(days=i % 300),
                "created_at": now, "updated_at": now} for i in range(1, studies + 1)])
            if gw.db.dialect == "postgresql":
                conn.execute(text("ANALYZE"))
        token = mint_dev_token(gw.settings, sub="bench", role="medical-illustration", minutes=240)
    finally:
        gw.close()
    return list(numbers), token


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, every thread


def measure(pid: int, runs: int, one) -> tuple[float, float, float]:
    """Server CPU ms a query, p50 and p95 ms, after 50 queries of warm-up (statements compiled, pools filled)."""
    for i in range(50):
        one(i)
    cpu = cpu_seconds(pid)
    times = sorted(one(i) for i in range(runs))
    return (cpu_seconds(pid) - cpu) / runs * 1000, statistics.median(times), times[int(runs * 0.95) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--postgres-url", default="", help="postgresql+psycopg://... (a schema of its own is made and dropped)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose `clinphoto serve` answers (default: this one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url, schema = f"sqlite:///{folder / 'var' / 'clinphoto.db'}", None
        if args.postgres_url:
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            with create_engine(args.postgres_url).begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
            url = f"{args.postgres_url}{'&' if '?' in args.postgres_url else '?'}options=-csearch_path%3D{schema}"
        try:
            run(args, folder, url)
        finally:
            if schema:
                with create_engine(args.postgres_url).begin() as conn:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def run(args: argparse.Namespace, folder: Path, url: str) -> None:
    config = folder / "clinphoto.yaml"
    config.write_text("auth:\n  dicom_peers:\n    - ae_title: BENCH\n      hosts: ['127.0.0.1']\n      allow: [echo, find]\n"
                      "      sensitivities: [N, R]\n")
    port, http_port = free_ports(2)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}, "CLINPHOTO_DATA_DIR": str(folder / "var"),
           "CLINPHOTO_DATABASE_URL": url, "CLINPHOTO_CONFIG": str(config), "CLINPHOTO_DICOM_PORT": str(port),
           "CLINPHOTO_HTTP_PORT": str(http_port), "CLINPHOTO_LISTENERS": '["dicom", "http"]', "CLINPHOTO_LOG_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    numbers, token = seed(url, folder / "var", args.studies, env, args.repo)
    print(f"{args.studies} studies stored in {time.perf_counter() - t0:.1f} s ({url.split(':')[0]}); gateway from {args.repo}",
          flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=args.repo, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                for p in (port, http_port):
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("clinphoto did not start") from None
                time.sleep(0.2)
        rows = {"C-FIND STUDY by PatientID": c_find(proc.pid, port, numbers, args.runs),
                "QIDO-RS /studies?PatientID": qido(proc.pid, http_port, token, numbers, args.runs)}
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"{'query':<28} {'server CPU ms':>14} {'p50 ms':>8} {'p95 ms':>8}")
    for name, (cpu, p50, p95) in rows.items():
        print(f"{name:<28} {cpu:>14.2f} {p50:>8.2f} {p95:>8.2f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


def c_find(pid: int, port: int, numbers: list[str], runs: int) -> tuple[float, float, float]:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND, [EXPLICIT])
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINPHOTO")
    if not assoc.is_established:
        raise SystemExit("no association")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one(i: int) -> float:
        q = Dataset()
        q.QueryRetrieveLevel, q.PatientID, q.StudyInstanceUID, q.StudyDate = "STUDY", numbers[i * 7919 % len(numbers)], "", ""
        t0 = time.perf_counter()
        statuses = [s.Status for s, _ in assoc.send_c_find(q, FIND) if s]
        elapsed = (time.perf_counter() - t0) * 1000
        if statuses != [0xFF00, 0x0000]:
            raise SystemExit(f"C-FIND for patient {i * 7919 % len(numbers)}: statuses {[hex(s) for s in statuses]}")
        return elapsed

    try:
        return measure(pid, runs, one)
    finally:
        assoc.release()


def qido(pid: int, port: int, token: str, numbers: list[str], runs: int) -> tuple[float, float, float]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/dicomweb",
                      headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}) as web:
        def one(i: int) -> float:
            t0 = time.perf_counter()
            r = web.get("/studies", params={"PatientID": numbers[i * 7919 % len(numbers)]})
            elapsed = (time.perf_counter() - t0) * 1000
            if r.status_code != 200 or len(r.json()) != 1:
                raise SystemExit(f"QIDO-RS: {r.status_code} {r.text[:200]}")
            return elapsed

        return measure(pid, runs, one)


if __name__ == "__main__":
    main()
