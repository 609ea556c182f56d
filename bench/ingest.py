"""Photo ingest figures: `python bench/ingest.py [--photos 24] [--concurrency 4] [--no-big]`.

1. JPEG -> DICOM per photo, in-process, against dcmtk `img2dcm -vlp` on the same
   12 MP files (both wrap without re-encoding; img2dcm pays a process start).
2. End-to-end photos/s through `POST /api/v1/photos` on a real `clinphoto serve`
   (SQLite, durable commits): checks, original + DICOM + preview + thumbnail blobs,
   asset + audit rows.
3. Peak RSS of the server during one ~190 MiB upload (a real 100 MP JPEG, the
   pixel limit), above its idle RSS: uploads are streamed to disk, never held whole.
4. Lossless sources (JPEG-LS): a 1-bit 10000 x 10000 PNG and a 12 MP photographic
   PNG, each prepared and written as Part 10 in a fresh process: seconds, DICOM
   size, peak RSS above the process's RSS before it.

Targets (issue 4): >= 12 photos/s on 2 cores; < 20 ms in-process wrap; < 100 MiB RSS over idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "fixtures" / "photos"))

import make as photo_fixtures  # noqa: E402

NHS = "https://fhir.nhs.uk/Id/nhs-number"
PATIENT_NHS = "9449305552"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo{i:03d}.jpg"
        if not path.exists():
            photo_fixtures.big_jpeg(path, seed=100 + i)
        paths.append(path)
    return paths


def bench_wrap(paths: list[Path], work: Path) -> dict:
    from gateway.core.ingest.config import IngestSettings
    from gateway.core.ingest.prepare import prepare
    from gateway.core.objects import jpeg, vlphoto
    from gateway.core.objects.uids import new_uid

    ours, full, theirs = [], [], []
    out = work / "ours.dcm"
    for path in paths:
        started = time.perf_counter()
        view = jpeg.FileView(path)
        info = jpeg.parse(view, find_end=False)  # clean_pieces walks the whole stream and sets eoi_end
        pixels = vlphoto.EncapsulatedJpeg(view, jpeg.clean_pieces(view, info), info.width, info.height, len(info.components),
                                          info.photometric, [("ISO_10918_1", info.pixels * 3 / info.eoi_end)], info.icc_profile)
        ds = vlphoto.build_dataset(
            pixels=pixels, patient=vlphoto.PatientInfo(PATIENT_NHS, "NHS", "Bench", "Patient"),
            study=vlphoto.StudyInfo(new_uid(), study_id="B"), series=vlphoto.SeriesInfo(new_uid(), 1),
            image=vlphoto.ImageInfo(new_uid(), 1), body_site=vlphoto.BodySite("85562004", "Hand", "left"),
        )
        with open(out, "wb") as f:
            vlphoto.write_part10(f, ds, pixels)
        view.close()
        ours.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        prepared = prepare(path, IngestSettings())
        prepared.close()
        full.append((time.perf_counter() - started) * 1000)

        if shutil.which("img2dcm"):
            started = time.perf_counter()
            subprocess.run(["img2dcm", "-vlp", str(path), str(work / "theirs.dcm")], check=True, capture_output=True)
            theirs.append((time.perf_counter() - started) * 1000)
    return {
        "files": len(paths),
        "clinphoto_wrap_ms_median": round(statistics.median(ours), 1),
        "clinphoto_checks_wrap_and_renditions_ms_median": round(statistics.median(full), 1),
        "img2dcm_vlp_ms_median": round(statistics.median(theirs), 1) if theirs else None,
    }


class Server:
    def __init__(self, data_dir: Path) -> None:
        shutil.rmtree(data_dir, ignore_errors=True)  # a fresh store every run
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
        self.env.update(
            CLINPHOTO_DATA_DIR=str(data_dir), CLINPHOTO_HTTP_PORT=str(self.port), CLINPHOTO_LISTENERS='["http"]',
            CLINPHOTO_LOG_LEVEL="WARNING",
        )
        self.data_dir = data_dir
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def seed_patient(self) -> None:
        from datetime import date

        from gateway.core.context import Gateway
        from gateway.core.identity import mint_dev_token
        from gateway.settings import Settings
        from store.models import Patient, PatientIdentifier

        settings = Settings(data_dir=self.data_dir)
        gw = Gateway.open(settings)
        # a dev-mode token signed with the key in DATA_DIR, which the server reads too
        self.token = mint_dev_token(settings, sub="bench-uploader", role="medical-illustration", minutes=120)
        with gw.db.write() as session:
            p = Patient(family_name="Bench", given_names="Patient", birth_date=date(1970, 1, 1), sex="F")
            p.identifiers = [PatientIdentifier(system=NHS, value=PATIENT_NHS, type_code="NH", assigner="NHS")]
            session.add(p)
        gw.close()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=self.env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.proc.stderr.read().decode()[-2000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0


def upload(server: Server, path: Path, client: httpx.Client) -> int:
    base = server.base
    metadata = {"patient": f"nhs|{PATIENT_NHS}", "bodySite": {"code": "85562004", "laterality": "left"}, "specialty": "330"}
    with open(path, "rb") as f:
        r = client.post(f"{base}/api/v1/photos", files=[("files", (path.name, f, "image/jpeg")),
                                                        ("metadata", (None, json.dumps(metadata), "application/json"))],
                        headers={"Authorization": f"Bearer {server.token}"}, timeout=300)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"upload of {path.name} failed: {r.status_code} {r.text[:300]}")
    return r.status_code


def bench_upload(paths: list[Path], work: Path, concurrency: int) -> dict:
    server = Server(work / "server-throughput")
    server.seed_patient()
    server.start()
    try:
        with httpx.Client() as client:
            upload(server, paths[0], client)  # warm-up (imports, first DB pages)
            rest = paths[1:]
            cpu_before = server.cpu_seconds()
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                codes = list(pool.map(lambda p: upload(server, p, client), rest))
            elapsed = time.perf_counter() - started
            cpu = server.cpu_seconds() - cpu_before
    finally:
        server.stop()
    return {
        "photos": len(rest), "concurrency": concurrency, "seconds": round(elapsed, 2),
        "photos_per_s": round(len(rest) / elapsed, 1), "all_201": all(c == 201 for c in codes),
        "mb_per_photo": round(statistics.mean(p.stat().st_size for p in rest) / 1e6, 2),
        "server_cpu_ms_per_photo": round(cpu / len(rest) * 1000, 1),
        "cpu_bound_photos_per_s": round(len(rest) / cpu * (os.cpu_count() or 1), 1),
    }


def bench_rss(work: Path, small: Path) -> dict:
    from PIL import Image

    big = work / "big100mp.jpg"
    if not big.exists():
        # noise compresses worst: 100 MP at quality 100 is a ~190 MiB JPEG, just under the 200 MiB limit
        Image.frombytes("RGB", (10000, 10000), os.urandom(10000 * 10000 * 3)).save(big, quality=100, subsampling=2)
    server = Server(work / "server-rss")
    server.seed_patient()
    server.start()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_kib())
            time.sleep(0.005)

    try:
        with httpx.Client() as client:
            upload(server, small, client)  # warm-up: every module loaded, pools open
            time.sleep(0.5)
            idle = server.rss_kib()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            upload(server, big, client)
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            hwm = server.rss_kib("VmHWM")
    finally:
        server.stop()
    return {
        "upload_mib": round(big.stat().st_size / 2**20, 1), "megapixels": 100, "seconds": round(elapsed, 2),
        "idle_rss_mib": round(idle / 1024, 1), "peak_rss_mib": round(max(peak[0], 0) / 1024, 1),
        "peak_above_idle_mib": round((peak[0] - idle) / 1024, 1), "vm_hwm_mib": round(hwm / 1024, 1),
    }


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def lossless_child(path: Path) -> None:
    """One prepare + Part 10 write in this (fresh) process; prints JSON figures."""
    import io

    from gateway.core.ingest.config import IngestSettings
    from gateway.core.ingest.prepare import prepare
    from gateway.core.objects import vlphoto
    from gateway.core.objects.uids import new_uid

    before = _status_mib("VmRSS")
    started = time.perf_counter()
    prepared = prepare(path, IngestSettings(), sha256="0" * 64)
    ds = vlphoto.build_dataset(
        pixels=prepared.pixels, patient=vlphoto.PatientInfo(PATIENT_NHS, "NHS"), study=vlphoto.StudyInfo(new_uid()),
        series=vlphoto.SeriesInfo(new_uid(), 1), image=vlphoto.ImageInfo(new_uid(), 1),
    )
    out = io.BytesIO()
    ts = vlphoto.write_part10(out, ds, prepared.pixels)
    prepared.close()
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "dicom_mb": round(out.tell() / 1e6, 3),
                      "transfer_syntax": ts, "peak_above_mib": round(_status_mib("VmHWM") - before)}))


def bench_lossless(work: Path) -> dict:
    from PIL import Image, ImageDraw

    one_bit = work / "one-bit-10000.png"
    if not one_bit.exists():
        image = Image.new("1", (10000, 10000), 1)
        ImageDraw.Draw(image).rectangle([2000, 2000, 3333, 5000], fill=0)
        image.save(one_bit, optimize=True)
    photo = work / "photo-12mp.png"
    if not photo.exists():
        photo_fixtures.photo_like(4032, 3024, seed=3).save(photo)
    figures = {}
    for label, path in (("one_bit_10000", one_bit), ("photo_12mp_png", photo)):
        child = subprocess.run([sys.executable, __file__, "--lossless-child", str(path)], capture_output=True, text=True,
                               check=True, cwd=REPO)
        figures[label] = {"source_mb": round(path.stat().st_size / 1e6, 3), **json.loads(child.stdout.strip().splitlines()[-1])}
    return figures


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--lossless-child":
        lossless_child(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-big", action="store_true", help="skip the 100 MP / ~190 MiB RSS run")
    parser.add_argument("--work", type=Path, default=None, help="keep generated photos here between runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clinphoto-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}  work dir: {work}")
    photos = make_photos(work / "photos", args.photos)
    print(f"12 MP JPEGs: {len(photos)} x ~{photos[0].stat().st_size / 1e6:.1f} MB")

    wrap = bench_wrap(photos[:10], work)
    print("JPEG -> DICOM per photo (median, 12 MP):")
    print(f"  clinphoto in-process wrap (parse, strip metadata, Part 10 write): {wrap['clinphoto_wrap_ms_median']} ms   (target < 20 ms)")
    print(f"  clinphoto full prepare (checks + wrap + preview + thumbnail):     {wrap['clinphoto_checks_wrap_and_renditions_ms_median']} ms")
    print(f"  dcmtk img2dcm -vlp (process per file):                           {wrap['img2dcm_vlp_ms_median']} ms")

    for label, f in bench_lossless(work).items():
        print(f"lossless {label}: {f['source_mb']} MB source -> {f['dicom_mb']} MB DICOM ({f['transfer_syntax']}) in "
              f"{f['seconds']} s, peak RSS {f['peak_above_mib']} MiB above the process before it")

    up = bench_upload(photos, work, args.concurrency)
    print(f"upload API end to end: {up['photos']} photos in {up['seconds']} s = {up['photos_per_s']} photos/s "
          f"(concurrency {up['concurrency']}, {up['mb_per_photo']} MB each, all 201: {up['all_201']})   (target >= 12/s)")
    print(f"  server CPU per photo: {up['server_cpu_ms_per_photo']} ms -> at most {up['cpu_bound_photos_per_s']} photos/s "
          f"on {os.cpu_count()} cores when nothing else runs (load average now {os.getloadavg()[0]:.1f})")

    if not args.no_big:
        rss = bench_rss(work, photos[0])
        print(f"one {rss['upload_mib']} MiB upload (100 MP JPEG) in {rss['seconds']} s: idle RSS {rss['idle_rss_mib']} MiB, "
              f"peak {rss['peak_rss_mib']} MiB, peak above idle {rss['peak_above_idle_mib']} MiB   (target < 100 MiB)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
