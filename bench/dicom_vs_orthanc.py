"""The DICOM door beside Orthanc: the same workload against `clinphoto serve` and a fresh Orthanc (Debian's package,
SQLite index, TCP_NODELAY set) in one run, printed as a ratio table.

    .venv/bin/python bench/dicom_vs_orthanc.py [--photos 50] [--batches 5] [--studies 2000,10000] [--only find,get]

First, in this process: the CPU clinphoto's renditions of one of these photos take (received.renditions, as the
renderer makes them). Orthanc makes none; where its whole C-STORE or STOW-RS of a photo takes less time than that, no
server making renditions keeps its pace on the same cores.

Beside both, the floor: the same client against servers of the same Python libraries doing nothing
(bench/python_floor.py), so the table shows how much of a gap is the stack's own cost here and how much clinphoto's work.

- C-STORE of batches of N 12-MP JPEG photos (VL Photographic, JPEG Baseline, as a camera exports them) over 1 and 4
  associations: files/s, the median of --batches batches of each server taken in turns, each server warmed first by
  three photos not counted. clinphoto checks each photo
  (everything but a decode) and stores it durably before answering, then decodes it and makes its preview and
  thumbnail (ingest.received_renditions: after-answer), once the photos stop coming (its renderer gives way to
  senders: decodes beside a burst took a sixth of the answering rate on 2 cores); the next row is the rate until the
  last of those renditions was made. Orthanc only writes the file.
- C-FIND STUDY by PatientID, p50/p95 ms, with the archive holding 2,000 and 10,000 studies (small objects, one per
  study, stored through each server's own C-STORE so both index them their own way).
- C-GET of a 10-photo study (12-MP photos), ms: the median of --rounds C-GETs of each server, taken in turns.
- DICOMweb (clinphoto's /dicomweb, Orthanc's DICOMweb plugin at /dicom-web): QIDO-RS /studies?PatientID p50/p95 ms at
  the same archive sizes; WADO-RS of one 12-MP instance as stored (transfer-syntax=*), median ms (in turns, as C-GET); STOW-RS of 12-MP
  photos, one instance per request, files/s after three uncounted (and, for clinphoto, until the last rendition was made),
  in batches in turns as C-STORE. The client is httpx
  with keep-alive and no Accept-Encoding (Orthanc gzips JPEG when allowed: peers-measured.md).
Both servers run as separate processes on 127.0.0.1; the client is pynetdicom in this process. clinphoto runs on
SQLite in a temporary folder (synchronous=FULL). Orthanc measured here before (peers-measured.md): C-STORE 14.5 /
31 files/s, C-FIND p95 15 ms at 2,000 studies and 42 ms at 10,000, C-GET 270-330 ms; QIDO-RS p95 9.9 / 32 ms,
WADO-RS 13-16 ms, STOW-RS 22.6-29.7 files/s. Machines here are noisy: read
the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom import Dataset, dcmwrite  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, build_role, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    VLPhotographicImageStorage,
)

from bench.hl7_throughput import nhs_number  # noqa: E402
from tests import dicom_objects as objects  # noqa: E402
from tests.net import free_ports  # noqa: E402
from tests.orthanc import Orthanc  # noqa: E402

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT = "1.2.840.10008.1.2.1"
NHS = "9449305552"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


def twelve_mp_jpeg() -> bytes:
    """A 4000x3000 photo-like JPEG (quality 90), ~3-5 MB, as a camera writes one."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([(x * 255 // 3999), (y * 255 // 2999), ((x + y) * 127 // 6998)], axis=2).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 12, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def photo(jpeg: bytes, study: str, series: str, patient_id: str = NHS) -> Dataset:
    ds = objects.dataset(rows=3000, columns=4000, photometric="YBR_FULL_422", patient_id=patient_id)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.LossyImageCompression, ds.LossyImageCompressionMethod, ds.LossyImageCompressionRatio = "01", "ISO_10918_1", "10"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated: pynetdicom encodes the element as it is marked
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    return ds


def small(patient_id: str, study: str) -> Dataset:
    ds = objects.dataset(rows=8, columns=8, samples=1, photometric="MONOCHROME2", patient_id=patient_id)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PixelData = bytes(64)
    ds["PixelData"].VR = "OB"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    return ds


def associate(port: int, called: str, contexts: list[tuple[str, list[str]]], **kw):
    ae = AE(ae_title="BENCH")
    # a 2-core machine shared with other work stalls now and then: pynetdicom's 30 s DIMSE timeout aborted seeding
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 300
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kw)
    if not assoc.is_established:
        raise SystemExit(f"no association with {called} on {port}")
    nodelay(assoc)
    return assoc


def nodelay(assoc) -> None:
    # the client's side too: pynetdicom leaves Nagle on, which holds each request's last segment ~40 ms
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def store_all(port: int, called: str, datasets: list[Dataset], associations: int, tolerate: bool = False) -> float:
    """files/s for sending every data set over `associations` parallel associations."""
    chunks = [datasets[i::associations] for i in range(associations)]
    failures: list[str] = []

    def send(chunk: list[Dataset]) -> None:
        # a context per transfer syntax: the server accepts each alone, photos go as JPEG, the small objects native
        contexts = [(VLPhotographicImageStorage, [JPEG_BASELINE]), (VLPhotographicImageStorage, [EXPLICIT])]
        assoc = associate(port, called, contexts)
        try:
            for ds in chunk:
                status = assoc.send_c_store(ds)
                for _retry in range(3):  # the association dropped (a loaded machine): again on a new one
                    if status or assoc.is_established:
                        break
                    time.sleep(1)
                    assoc = associate(port, called, contexts)
                    status = assoc.send_c_store(ds)
                if not status or status.Status != 0:
                    failures.append(f"0x{getattr(status, 'Status', 0xFFFF):04X} {getattr(status, 'ErrorComment', '')}")
        finally:
            if assoc.is_established:
                assoc.release()

    start = time.perf_counter()
    threads = [threading.Thread(target=send, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures and not tolerate:
        raise SystemExit(f"{called}: {len(failures)} C-STORE failures, e.g. {failures[0]}")
    if failures:  # seeding: a few lost on a loaded machine leave the archive's size as good as it was
        print(f"  {called}: {len(failures)} of {len(datasets)} seed objects not stored ({failures[0]})", flush=True)
    return len(datasets) / elapsed


def find_times(port: int, called: str, patient_ids: list[str], runs: int = 200) -> tuple[float, float]:
    assoc = associate(port, called, [(StudyRootQueryRetrieveInformationModelFind, [EXPLICIT])])
    times = []
    try:
        for i in range(runs):
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.PatientID = patient_ids[i % len(patient_ids)]
            q.StudyInstanceUID = ""
            q.StudyDate = ""
            t0 = time.perf_counter()
            answers = [s for s, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind) if s and s.Status == 0xFF00]
            times.append((time.perf_counter() - t0) * 1000)
            if not answers:
                print(f"  {called}: C-FIND for {q.PatientID} found nothing (a seed object lost?)", flush=True)
    finally:
        assoc.release()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def get_time(port: int, called: str, study: str, expected: int, runs: int = 5) -> float:
    received: list[int] = []
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(VLPhotographicImageStorage, [JPEG_BASELINE])
    times = []
    for _ in range(runs):
        received.clear()
        assoc = ae.associate("127.0.0.1", port, ae_title=called, ext_neg=[build_role(VLPhotographicImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0x0000)])
        nodelay(assoc)
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        t0 = time.perf_counter()
        for _status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
            pass
        times.append((time.perf_counter() - t0) * 1000)
        assoc.release()
        if len(received) != expected:
            raise SystemExit(f"{called}: C-GET brought {len(received)} of {expected}")
    return statistics.median(times)


DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def in_turns(measures: dict[str, Callable[[], tuple[float, ...]]], rounds: int) -> dict[str, tuple[float, ...]]:
    """The medians of `rounds` runs of each measure (each run gives one or more figures), taken in turns (the first to
    go alternates), so a slow spell of a shared machine falls on every server alike."""
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in measures}
    names = list(measures)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            runs[name].append(measures[name]())
    return {name: tuple(statistics.median(figures) for figures in zip(*r)) for name, r in runs.items()}


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """The median of `rounds` runs of each measure, taken in turns (the first to go alternates)."""
    medians = in_turns({name: (lambda m=measure: (m(),)) for name, measure in measures.items()}, rounds)
    return {name: figures[0] for name, figures in medians.items()}


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def qido_times(web: httpx.Client, root: str, patient_ids: list[str], runs: int = 200) -> tuple[float, float]:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        r = web.get(f"{root}/studies", params={"PatientID": patient_ids[i % len(patient_ids)]})
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{root}: QIDO-RS answered {r.status_code} {r.text[:200]}")
        if not r.json():
            print(f"  {root or 'clinphoto'}: QIDO-RS found nothing (a seed object lost?)", flush=True)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def wado_time(web: httpx.Client, root: str, study: str, series: str, sop: str, runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = web.get(f"{root}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": DICOM_ANY})
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200 or len(r.content) < 1_000_000 or "content-encoding" in r.headers:
            raise SystemExit(f"{root}: WADO-RS answered {r.status_code}, {len(r.content)} bytes, {r.headers.get('content-encoding')}")
    return statistics.median(times)


def stow_rate(web: httpx.Client, root: str, datasets: list[Dataset]) -> float:
    bodies = []
    for ds in datasets:
        boundary = generate_uid().replace(".", "")
        body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ds) + f"\r\n--{boundary}--\r\n".encode()
        bodies.append((body, f'multipart/related; type="application/dicom"; boundary={boundary}'))
    start = time.perf_counter()
    for body, ctype in bodies:
        r = web.post(f"{root}/studies", content=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
        if r.status_code != 200:
            raise SystemExit(f"{root}: STOW-RS answered {r.status_code} {r.text[:300]}")
    return len(bodies) / (time.perf_counter() - start)


class Clinphoto:
    """`clinphoto serve` (DICOM only) on a fresh SQLite store with the bench's patients registered."""

    def __init__(self, folder: Path, patients: list[str]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_ports(2)
        config = folder / "clinphoto.yaml"
        config.write_text("auth:\n  dicom_peers:\n    - ae_title: BENCH\n      hosts: ['127.0.0.1']\n"
                          "      allow: [echo, store, find, get, move]\n      sensitivities: [N, R]\n")
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")},
                    "CLINPHOTO_DATA_DIR": str(folder / "var"), "CLINPHOTO_CONFIG": str(config), "CLINPHOTO_DICOM_PORT": str(self.port),
                    "CLINPHOTO_HTTP_PORT": str(self.http_port),
                    "CLINPHOTO_LISTENERS": '["dicom", "http"]', "CLINPHOTO_LOG_LEVEL": "WARNING"}
        self._register(patients)
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.http_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("clinphoto did not start")

    def _register(self, patients: list[str]) -> None:
        """The patients (NHS numbers), each with a record consent, as the PAS feed and the ward would leave them."""
        from gateway.core.context import Gateway
        from gateway.core.identity import mint_dev_token
        from gateway.settings import Settings
        from store.models import Consent, Patient, PatientIdentifier

        gw = Gateway.open(Settings(data_dir=self.folder / "var"))
        # a dev-mode token (the store's own key) for the DICOMweb measures
        self.token = mint_dev_token(gw.settings, sub="bench", role="medical-illustration", minutes=240)
        try:
            with gw.db.write() as s:
                for n in patients:
                    p = Patient(family_name="BENCH", identifiers=[PatientIdentifier(system=NHS_SYSTEM, value=n, type_code="NH")])
                    s.add(p)
                    s.flush()
                    s.add(Consent(patient_id=p.id, level="record", given_by="patient"))
        finally:
            gw.close()

    def rendered_at(self, timeout: float = 600) -> float:
        """perf_counter() when no photo waits for its renditions any more (they are made after the answer)."""
        from gateway.core.context import Gateway
        from gateway.core.ingest.deferred import due
        from gateway.settings import Settings

        gw = Gateway.open(Settings(data_dir=self.folder / "var"), migrate=False, tidy=False)
        try:
            deadline = time.monotonic() + timeout
            while due(gw, limit=1) and time.monotonic() < deadline:
                time.sleep(0.02)
            return time.perf_counter()
        finally:
            gw.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def wait_for_ports(ports: tuple[int, ...] | list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listening on {ports}")


def measure_floor(floor: Measured, ports: list[int], legs: set[str], photos: int, jpeg: bytes, patient_ids: list[str],
                  sizes: list[int]) -> None:
    """The same client against servers of the same libraries doing nothing (bench/python_floor.py)."""
    dicom_port, http_port = ports
    web = httpx.Client(base_url=f"http://127.0.0.1:{http_port}/dicomweb", timeout=120, headers={"Accept-Encoding": "identity"})
    try:
        for assocs in (1, 4) if "store" in legs else ():
            batch = [photo(jpeg, generate_uid(), generate_uid()) for _ in range(photos)]
            floor[f"C-STORE 12-MP, {assocs} assoc. (files/s)"] = store_all(dicom_port, "FLOOR", batch, assocs)
        if legs & {"get", "web"}:
            study, series = generate_uid(), generate_uid()
            study_photos = [photo(jpeg, study, series) for _ in range(10)]
            floor["C-STORE of the C-GET study (files/s)"] = store_all(dicom_port, "FLOOR", study_photos, 1)
            if "get" in legs:
                floor["C-GET 10-photo study (ms)"] = get_time(dicom_port, "FLOOR", study, 10)
            if "web" in legs:
                floor["WADO-RS one 12-MP instance, as stored (ms)"] = wado_time(web, "", study, series, study_photos[0].SOPInstanceUID)
                stowed = [photo(jpeg, generate_uid(), generate_uid()) for _ in range(max(photos // 2, 10))]
                floor["STOW-RS 12-MP, one per request (files/s)"] = stow_rate(web, "", stowed)
        for size in sizes:  # nothing is stored for these: the floor is the same at every size, measured at each
            if "find" in legs:
                p50, p95 = find_times(dicom_port, "FLOOR", patient_ids)
                floor[f"C-FIND STUDY by PatientID, {size} studies p50 (ms)"] = p50
                floor[f"C-FIND STUDY by PatientID, {size} studies p95 (ms)"] = p95
            if "web" in legs:
                p50, p95 = qido_times(web, "", patient_ids)
                floor[f"QIDO-RS studies by PatientID, {size} studies p50 (ms)"] = p50
                floor[f"QIDO-RS studies by PatientID, {size} studies p95 (ms)"] = p95
    finally:
        web.close()


def rendition_cpu_ms(jpeg: bytes, runs: int = 7) -> float:
    """CPU (ms, best of `runs`) of the renditions clinphoto makes for one of the bench's photos, in this process: the
    decode at the smallest DCT scale that gives the preview, the preview and the thumbnail (received.renditions, what
    the renderer runs). Orthanc makes none: when its whole C-STORE or STOW-RS of a photo takes less than this, no
    server making them can keep its pace on the same cores."""
    from gateway.core.ingest import received
    from gateway.settings import Settings

    settings = Settings().ingest
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.dcm"
        path.write_bytes(part10(photo(jpeg, generate_uid(), generate_uid())))
        obj = received.read(path, settings)
        times = []
        for _ in range(runs):
            start = time.process_time()
            received.renditions(obj, settings, Path(tmp))
            times.append((time.process_time() - start) * 1000)
    return min(times)


class Measured(dict[str, float]):
    """Each figure printed as it is measured, so a run that fails late still leaves what it measured."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __setitem__(self, key: str, value: float) -> None:
        print(f"  {self.name}: {key} = {value:.1f}", flush=True)
        super().__setitem__(key, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=50, help="photos per C-STORE batch (STOW-RS: half as many)")
    ap.add_argument("--batches", type=int, default=5, help="batches of each server, in turns, for each receiving rate (the median)")
    ap.add_argument("--studies", default="2000,10000")
    ap.add_argument("--rounds", type=int, default=15, help="C-GETs of each server, in turns (WADO-RS: four times as many)")
    ap.add_argument("--only", default="store,get,web,find",
                    help="the legs to run, of store (C-STORE 1 and 4 assoc.), get (the study's C-STORE, C-GET), web (WADO-RS, "
                         "STOW-RS, QIDO-RS) and find (seeding, C-FIND); default all")
    args = ap.parse_args()
    legs = set(args.only.split(","))
    if not legs <= {"store", "get", "web", "find"}:
        raise SystemExit(f"--only: unknown legs {sorted(legs - {'store', 'get', 'web', 'find'})}")
    sizes = [int(s) for s in args.studies.split(",")]
    # distinct valid NHS numbers (nhs_number steps over stems without a check digit, so two n can meet)
    unique: dict[str, None] = {}
    n = 0
    while len(unique) < max(sizes):
        unique.setdefault(nhs_number(n), None)
        n += 1
    unique.pop(NHS, None)
    patients = list(unique)
    jpeg = twelve_mp_jpeg()
    print(f"12-MP JPEG: {len(jpeg) / 1e6:.1f} MB; {args.photos} photos; studies {sizes}; load average {os.getloadavg()[0]:.1f}")
    if legs & {"store", "web"}:
        print(f"clinphoto's renditions of one photo: {rendition_cpu_ms(jpeg):.1f} ms of CPU (in this process; compare "
              f"1000 / Orthanc's files/s below)", flush=True)
    rows = {"clinphoto": Measured("clinphoto"), "orthanc": Measured("orthanc")}
    floor = Measured("floor")
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"clinphoto": Clinphoto(Path(tmp) / "c", [NHS, *patients]),
                   "orthanc": Orthanc(Path(tmp) / "o", dicomweb_servers={}).start()}
        ports = {"clinphoto": servers["clinphoto"].port, "orthanc": servers["orthanc"].dicom_port}
        called = {"clinphoto": "CLINPHOTO", "orthanc": "ORTHANC"}
        # httpx asks for gzip by default: not here (Orthanc would gzip the JPEG; clinphoto never compresses images)
        webs = {"clinphoto": httpx.Client(base_url=f"http://127.0.0.1:{servers['clinphoto'].http_port}/dicomweb", timeout=120,
                                          headers={"Authorization": f"Bearer {servers['clinphoto'].token}", "Accept-Encoding": "identity"}),
                "orthanc": httpx.Client(base_url=f"{servers['orthanc'].url}/dicom-web", timeout=120, headers={"Accept-Encoding": "identity"})}
        held_study: dict[str, tuple[str, str, str]] = {}  # each server's 10-photo study, series, first instance
        floor_ports = free_ports(2)
        floor_proc = subprocess.Popen([sys.executable, "-m", "bench.python_floor", *map(str, floor_ports)], cwd=ROOT)
        try:
            wait_for_ports(floor_ports)
            for name in ("clinphoto", "orthanc"):
                # warmed alike, not measured: a first association's, request's and photo's one-time costs (imports,
                # caches; clinphoto's renderer starting its worker processes, ~1 s of CPU) are not a rate
                if "store" in legs:
                    store_all(ports[name], called[name], [photo(jpeg, generate_uid(), generate_uid()) for _ in range(3)], 1)
                if "web" in legs:
                    stow_rate(webs[name], "", [photo(jpeg, generate_uid(), generate_uid()) for _ in range(3)])
                if name == "clinphoto":
                    servers["clinphoto"].rendered_at()

            def batch_rates(name: str, send: Callable[[list[Dataset]], float], count: int) -> tuple[float, float]:
                """One batch: the rate answered and, for clinphoto, the rate until its last rendition was made (it
                answers first; Orthanc makes none, so answered is done). clinphoto's renderer is idle again before
                the other server's batch begins."""
                batch = [photo(jpeg, generate_uid(), generate_uid()) for _ in range(count)]
                start = time.perf_counter()
                rate = send(batch)
                done = servers["clinphoto"].rendered_at() if name == "clinphoto" else None
                return rate, (count / (done - start) if done else rate)

            # the receiving rates, batch by batch in turns: measured one server after the other, the same code's
            # C-STORE ratio moved 0.85-1.07 between runs
            for assocs in (1, 4) if "store" in legs else ():
                got = in_turns({name: (lambda n=name, a=assocs: batch_rates(
                    n, lambda b: store_all(ports[n], called[n], b, a), args.photos)) for name in servers}, args.batches)
                for name, (rate, until) in got.items():
                    rows[name][f"C-STORE 12-MP, {assocs} assoc. (files/s)"] = rate
                    rows[name][f"C-STORE 12-MP, {assocs} assoc., until rendered (files/s)"] = until
            if "web" in legs:
                got = in_turns({name: (lambda n=name: batch_rates(
                    n, lambda b: stow_rate(webs[n], "", b), max(args.photos // 2, 10))) for name in servers}, args.batches)
                for name, (rate, until) in got.items():
                    rows[name]["STOW-RS 12-MP, one per request (files/s)"] = rate
                    rows[name]["STOW-RS 12-MP, until rendered (files/s)"] = until

            for name in ("clinphoto", "orthanc"):
                if legs & {"get", "web"}:
                    study, series = generate_uid(), generate_uid()
                    study_photos = [photo(jpeg, study, series) for _ in range(10)]
                    rows[name]["C-STORE of the C-GET study (files/s)"] = store_all(ports[name], called[name], study_photos, 1)
                    if name == "clinphoto":
                        servers["clinphoto"].rendered_at()  # its renderer idle again: it would share the CPUs with what follows
                    held_study[name] = (study, series, study_photos[0].SOPInstanceUID)
                held = 0
                for size in sizes if legs & {"find", "web"} else ():
                    extra = [small(patients[i], generate_uid()) for i in range(held, size)]
                    # seeding, one association: Orthanc dropped one of four under this load
                    store_all(ports[name], called[name], extra, 1, tolerate=True)
                    if name == "clinphoto":
                        servers["clinphoto"].rendered_at()
                    held = size
                    if "find" in legs:
                        p50, p95 = find_times(ports[name], called[name], patients[:size])
                        rows[name][f"C-FIND STUDY by PatientID, {size} studies p50 (ms)"] = p50
                        rows[name][f"C-FIND STUDY by PatientID, {size} studies p95 (ms)"] = p95
                    if "web" in legs:
                        p50, p95 = qido_times(webs[name], "", patients[:size])
                        rows[name][f"QIDO-RS studies by PatientID, {size} studies p50 (ms)"] = p50
                        rows[name][f"QIDO-RS studies by PatientID, {size} studies p95 (ms)"] = p95
            # C-GET and WADO-RS take tens of ms: measured in turns, one server then the other, so a slow spell of a
            # shared machine falls on both alike (measured one server after the other, the ratio moved 0.97-1.40)
            if "get" in legs:
                got = interleaved({name: (lambda n=name: get_time(ports[n], called[n], held_study[n][0], 10, runs=1))
                                   for name in servers}, rounds=args.rounds)
                for name, median in got.items():
                    rows[name]["C-GET 10-photo study (ms)"] = median
            if "web" in legs:
                got = interleaved({name: (lambda n=name: wado_time(webs[n], "", *held_study[n], runs=1)) for name in servers},
                                  rounds=args.rounds * 4)
                for name, median in got.items():
                    rows[name]["WADO-RS one 12-MP instance, as stored (ms)"] = median
            measure_floor(floor, floor_ports, legs, args.photos, jpeg, patients[:min(sizes)], sizes)
        finally:
            for web in webs.values():
                web.close()
            servers["clinphoto"].stop()
            servers["orthanc"].stop()
            floor_proc.terminate()
            floor_proc.wait(30)
    print(f"{'measure':<52} {'clinphoto':>10} {'Orthanc':>10} {'ratio':>7} {'floor':>8}")
    for key in rows["clinphoto"]:
        c, o = rows["clinphoto"][key], rows["orthanc"][key]
        f = f"{floor[key]:>8.1f}" if key in floor else f"{'-':>8}"
        print(f"{key:<52} {c:>10.1f} {o:>10.1f} {c / o:>7.2f} {f}")
    print("ratio = clinphoto / Orthanc (files/s: higher is better; ms: lower is better)")
    print("floor = the same client against a pynetdicom SCP and a FastAPI/uvicorn app that do nothing (bench/python_floor.py):")
    print("        what Python's stack itself allows on this machine, measured in this run (clinphoto's DICOM door reads")
    print("        PDUs and spools data sets itself, not as pynetdicom does: its C-STORE can pass this floor)")


if __name__ == "__main__":
    main()
