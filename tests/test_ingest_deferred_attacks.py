"""Attacks on renditions made after the answer (ingest.received_renditions: after-answer), on both backends.

Each test states the behaviour the brief's rules ask for: nothing acknowledged before it is committed; no partial
asset, no orphan blob and no lost audit record after a crash; every access audited; no patient data in logs at
INFO or above. Crashes are real: `clinphoto serve` is killed with SIGKILL while a second database connection holds
the write its commit needs (so the kill lands exactly between the blob and the row), or the moment it has the
stored object open to decode it. A blob a crash leaves unnamed is whole, and named again by the sender's retry
(or removed by `clinphoto store gc`, as for every blob write). The strict xfails are defects left open, each
reason saying where and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from gateway.core import access, operations
from gateway.core.context import Gateway
from gateway.core.identity import Subject
from gateway.core.ingest import deferred, received
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.renditions import DUE, FAILED
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.refusals import Refused
from store import audit
from store.integrity import check_store
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient

PEER = Source.dicom_peer("MODALITY1", "10.1.2.3")
ILLUSTRATOR = Subject(sub="mi.jones", role="medical-illustration", scopes=("user/*.cruds",))
ADMIN = Subject(sub="it.admin", role="admin", scopes=("user/*.cruds",))


def receive(gw: Gateway, path: Path, spooled: bool = False):
    return ingest(gw, CaptureRequest(source=PEER, items=[ReceivedObject(path, filename=path.name, spooled=spooled)]))


def load(gw: Gateway, asset_id: str) -> Asset:
    with gw.db.read() as s:
        row = s.get(Asset, asset_id)
        assert row is not None
        s.expunge(row)
        return row


def good_object(tmp_path: Path, fx, name: str = "good.dcm") -> Path:
    return objects.jpeg_wrapped(tmp_path / name, fx["baseline_420.jpg"].read_bytes(), 640, 480)


def damaged_inside(tmp_path: Path, fx, name: str = "damaged.dcm") -> Path:
    """Whole in form (header, scan, end-of-image) but half its entropy-coded data gone: only a decode can tell."""
    jpeg = fx["baseline_420.jpg"].read_bytes()
    return objects.jpeg_wrapped(tmp_path / name, jpeg[: len(jpeg) // 2] + b"\xff\xd9", 640, 480)


def events(gw: Gateway, **where) -> list[AuditEvent]:
    with gw.db.read() as s:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        for name, value in where.items():
            query = query.where(getattr(AuditEvent, name) == value)
        rows = list(s.scalars(query))
        s.expunge_all()
        return rows


def clean_store(gw: Gateway) -> None:
    report = check_store(gw.db, gw.blobs, verify_hashes=True)
    assert not (report.orphans or report.missing or report.corrupt), report.summary()


def chain_ok(gw: Gateway) -> None:
    with gw.db.read() as s:
        report = audit.verify(s)
    assert report.ok, report


# --- the reader and the policy ------------------------------------------------------------------------------


def test_a_reader_the_policy_refuses_makes_nothing_and_the_denial_is_audited(gw, fx, tmp_path):
    """The on-demand make comes after the policy: a caller who may not see the photo neither gets nor causes a
    decode (no side effect to probe with), and the denial is in the trail."""
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    outsider = Subject(sub="dr.elsewhere", role="clinician", specialties=("110",), scopes=("user/*.cruds",))
    educator = Subject(sub="edu", role="educator", purpose_of_use="TRAIN", scopes=("user/*.cruds",))  # no teaching consent
    for who in (outsider, educator):
        ctx = access.photo_request(gw, who, "read", "test")
        with pytest.raises(Refused):
            access.image(gw, ctx, asset_id, "preview", "test")
        denied = [e for e in events(gw, agent_who=who.sub) if e.outcome != audit.SUCCESS]
        assert denied and denied[-1].entities[0]["id"] == asset_id
    asset = load(gw, asset_id)
    assert asset.rendition_state == DUE and asset.preview_sha256 is None  # nothing decoded for them
    with pytest.raises(Refused):
        access.photo_request(gw, ADMIN, "read", "test")  # admin sees no photos at all


def test_a_reader_of_a_photo_whose_pixels_did_not_decode_is_audited(gw, fx, tmp_path):
    """Every access, allowed or denied, is audited: a reader the policy lets see the photo, who asks for the
    preview of one whose pixels turn out damaged (found by their own request, or earlier), is in the trail."""
    add_patient(gw)
    asset_id = receive(gw, damaged_inside(tmp_path, fx)).photos[0].asset_id
    ctx = access.photo_request(gw, ILLUSTRATOR, "read", "test")
    for attempt in (1, 2):  # the first finds it out (the on-demand make), the second reads the failed state
        with pytest.raises(Refused):
            access.image(gw, ctx, asset_id, "preview", "test")
        mine = [e for e in events(gw, agent_who=ILLUSTRATOR.sub) if any(x.get("id") == asset_id for x in e.entities)]
        assert len(mine) == attempt, f"attempt {attempt}: the reader's retrieve is not in the audit trail"
        assert mine[-1].outcome != audit.SUCCESS  # nothing was served
    assert load(gw, asset_id).rendition_state == FAILED
    chain_ok(gw)


def test_a_teaching_consent_withdrawn_while_due_closes_the_photo_to_teaching_before_any_make(gw, fx, tmp_path):
    from gateway.core.consents import record_consent, withdraw_consent

    patient = add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    with gw.db.write() as s:
        teaching = record_consent(s, patient_id=patient["id"], level="teaching", given_by="patient",
                                  captured_by="mi.jones").id
    educator = Subject(sub="edu", role="educator", purpose_of_use="TRAIN", scopes=("user/*.cruds",))
    ctx = access.photo_request(gw, educator, "read", "test")
    assert access.read(gw, ctx, asset_id).asset.id == asset_id  # open to teaching while the consent stands
    with gw.db.write() as s:
        withdraw_consent(s, teaching, withdrawn_by="patient")
    with pytest.raises(Refused):
        access.image(gw, ctx, asset_id, "preview", "test")
    assert load(gw, asset_id).rendition_state == DUE  # nothing decoded for a reader the policy now refuses
    denied = [e for e in events(gw, agent_who="edu") if e.outcome != audit.SUCCESS]
    assert denied and denied[-1].entities[0]["id"] == asset_id


def test_a_photo_merged_while_due_is_made_and_a_failure_is_audited_under_the_survivor(gw, fx, tmp_path):
    from store.models import Patient

    first = add_patient(gw)
    survivor = add_patient(gw, nhs="9434765919", mrn="M200", visit="V200")
    asset_id = receive(gw, damaged_inside(tmp_path, fx)).photos[0].asset_id
    with gw.db.write() as s:  # what an A40 does to a photo: it moves with the merged record
        s.get_one(Patient, first["id"]).merged_into_id = survivor["id"]
        s.get_one(Asset, asset_id).patient_id = survivor["id"]
    assert deferred.make(gw, asset_id).state == FAILED
    failed = events(gw, outcome=audit.SERIOUS_FAILURE)
    assert [e.patient_id for e in failed] == [survivor["id"]]


def test_a_photo_taken_out_of_the_record_while_due_is_not_made_for_a_reader(gw, fx, tmp_path):
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    with gw.db.write() as s:
        s.get_one(Asset, asset_id).status = "entered-in-error"
    ctx = access.photo_request(gw, Subject(sub="dr.derm", role="clinician", specialties=("330",), scopes=("user/*.cruds",)),
                               "read", "test")
    with pytest.raises(Refused):
        access.image(gw, ctx, asset_id, "preview", "test")
    assert load(gw, asset_id).rendition_state == DUE


# --- the blob store ------------------------------------------------------------------------------------------


def test_a_spool_on_another_filesystem_is_copied_into_the_store(gw, fx, tmp_path):
    """A hard link cannot cross filesystems (EXDEV): the spooled object is copied, the answer the same."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to spool on")
    spool_dir = other / f"clinphoto-spool-{os.getpid()}-{time.monotonic_ns()}"
    gw.settings.ingest.spool_dir = spool_dir
    other_gw = Gateway(settings=gw.settings, db=gw.db, blobs=gw.blobs)
    try:
        add_patient(other_gw)
        fd, spooled = other_gw.spool.new_file(prefix="cstore-", suffix=".dcm")
        os.close(fd)
        source = good_object(tmp_path, fx)
        shutil.copyfile(source, spooled)
        asset = load(other_gw, receive(other_gw, spooled, spooled=True).photos[0].asset_id)
        blob = other_gw.blobs.path(asset.dicom_sha256)
        assert os.stat(blob).st_ino != os.stat(spooled).st_ino  # copied: a link cannot cross filesystems
        spooled.unlink()
        assert blob.read_bytes() == source.read_bytes() and other_gw.blobs.check(asset.dicom_sha256)
        assert deferred.make(other_gw, asset.id).state is None
        clean_store(other_gw)
    finally:
        other_gw.spool.close()
        shutil.rmtree(spool_dir, ignore_errors=True)


def test_the_same_object_sent_twice_at_once_is_stored_once_and_made_once(gw, fx, tmp_path):
    add_patient(gw)
    source = good_object(tmp_path, fx)
    copies = []
    for _ in range(4):
        fd, path = gw.spool.new_file(prefix="cstore-", suffix=".dcm")
        os.close(fd)
        shutil.copyfile(source, path)
        copies.append(path)
    results: list[object] = [None] * len(copies)
    start = threading.Barrier(len(copies))

    def send(i: int) -> None:
        start.wait()
        try:
            results[i] = receive(gw, copies[i], spooled=True).photos[0]
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            results[i] = exc
        finally:
            copies[i].unlink(missing_ok=True)  # what the door does after the answer

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(copies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.status for r in results) == ["created"] + ["existing"] * (len(copies) - 1)  # type: ignore[attr-defined]
    assert len({r.asset_id for r in results}) == 1  # type: ignore[attr-defined]
    asset_id = results[0].asset_id  # type: ignore[attr-defined]
    assert deferred.due(gw) == [asset_id]
    made = [deferred.make(gw, asset_id) for _ in range(2)]
    assert made[0] == made[1] and made[0].state is None
    assert gw.blobs.read_bytes(load(gw, asset_id).dicom_sha256) == source.read_bytes()
    clean_store(gw)


def test_a_due_photo_whose_stored_object_was_briefly_missing_gets_its_preview_once_it_is_back(gw, fx, tmp_path):
    """A missing blob is the store's fault (a mount away, a restore under way), not damage to the photo: the
    photo must not be marked failed for good, nor audited as 'its pixels did not decode'."""
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    blob = gw.blobs.path(load(gw, asset_id).dicom_sha256)
    aside = tmp_path / "aside.dcm"
    os.replace(blob, aside)
    with pytest.raises(FileNotFoundError):  # the renderer, or a reader (a 500, audited), meets the store without it
        deferred.make(gw, asset_id)
    assert load(gw, asset_id).rendition_state == DUE and load(gw, asset_id).rendition_tries == 0  # not counted
    assert deferred.due(gw, ready=True) == []  # the renderer leaves it for a while, taking the others
    os.replace(aside, blob)
    made = deferred.make(gw, asset_id)
    assert made.state is None and made.preview_sha256, made
    assert not [e for e in events(gw, outcome=audit.SERIOUS_FAILURE) if "did not decode" in (e.outcome_desc or "")]


# --- the renderer --------------------------------------------------------------------------------------------


def test_many_due_photos_at_start_are_each_made_once_by_the_renderer(gw, fx, tmp_path):
    """A backlog at start-up (a process killed during a burst): every photo made, the same pixels under several
    instances (one shared preview blob) made by two threads at once without a lost or orphaned blob."""
    add_patient(gw)
    jpeg = fx["baseline_420.jpg"].read_bytes()
    ids = [receive(gw, objects.jpeg_wrapped(tmp_path / f"same{i}.dcm", jpeg, 640, 480)).photos[0].asset_id for i in range(12)]
    ids.append(receive(gw, damaged_inside(tmp_path, fx)).photos[0].asset_id)
    assert sorted(deferred.due(gw, limit=100)) == sorted(ids)
    gw.renditions_wanted.clear()  # as at a start: nothing wakes it but its first round
    renderer = deferred.Renderer(gw, poll_seconds=30, threads=2)
    renderer.start()
    try:
        deadline = time.monotonic() + 120
        while deferred.due(gw, limit=100) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        renderer.stop()
    assert deferred.due(gw, limit=100) == []
    previews = {load(gw, i).preview_sha256 for i in ids[:-1]}
    assert len(previews) == 1 and None not in previews
    assert load(gw, ids[-1]).rendition_state == FAILED
    assert len(events(gw, outcome=audit.SERIOUS_FAILURE)) == 1
    clean_store(gw)


def test_a_renderer_stopped_during_a_backlog_leaves_each_photo_made_or_due_and_no_orphan(gw, fx, tmp_path):
    """`serve` stopping (SIGTERM) while the renderer works through a backlog: the photos in hand are finished, the
    rest stay due for the next start; no row names a blob that is not there and no blob is left unnamed."""
    add_patient(gw)
    ids = [receive(gw, objects.native(tmp_path / f"n{i}.dcm", objects.gradient(600 + i, 800))).photos[0].asset_id
           for i in range(10)]
    renderer = deferred.Renderer(gw, poll_seconds=30, threads=2)
    renderer.start()
    wait_for(lambda: len(deferred.due(gw, limit=100)) < len(ids))
    renderer.stop()
    assert not renderer.running
    rows = [load(gw, i) for i in ids]
    assert {r.rendition_state for r in rows} <= {None, DUE}
    for row in rows:
        assert (row.preview_sha256 is None) == (row.rendition_state == DUE)
    assert len(deferred.due(gw, limit=100)) > 0, "the whole backlog was made before the stop: nothing was tested"
    clean_store(gw)


def test_the_console_counts_due_and_failed_photos(gw, fx, tmp_path):
    add_patient(gw)
    good = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    bad = receive(gw, damaged_inside(tmp_path, fx)).photos[0].asset_id
    engineer = Subject(sub="ie.smith", role="integration-engineer", scopes=("user/*.cruds",))
    ctx = access.screen(gw, engineer, "console")
    assert operations.counters(gw, ctx, minutes=5, what="test").renditions == {DUE: 2, FAILED: 0}
    deferred.make(gw, good)
    deferred.make(gw, bad)
    assert operations.counters(gw, ctx, minutes=5, what="test").renditions == {DUE: 0, FAILED: 1}


def test_no_patient_data_in_logs_at_info_or_above(gw, fx, tmp_path, caplog):
    add_patient(gw)
    caplog.set_level(logging.DEBUG)
    good = objects.jpeg_wrapped(tmp_path / "named.dcm", fx["baseline_420.jpg"].read_bytes(), 640, 480,
                                name="SULLIVAN^SIOBHAN")
    ids = [receive(gw, good).photos[0].asset_id, receive(gw, damaged_inside(tmp_path, fx)).photos[0].asset_id]
    renderer = deferred.Renderer(gw, poll_seconds=30, threads=1)
    renderer.start()
    try:
        deadline = time.monotonic() + 60
        while deferred.due(gw) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        renderer.stop()
    assert {load(gw, i).rendition_state for i in ids} == {None, FAILED}
    loud = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for secret in ("9449305552", "944 930 5552", "SULLIVAN", "Siobh", "Súilleabháin", "SENDER"):
        assert secret not in loud


# --- real processes killed at the worst moment -----------------------------------------------------------------


@contextlib.contextmanager
def holding_commit(gw: Gateway, *, patient_id: int | None = None, asset_id: str | None = None) -> Iterator[None]:
    """Another connection holds what the next commit needs: SQLite's write lock, or on PostgreSQL the patient row
    an ingest locks before its insert and the asset row the renderer updates. Everything before the commit runs."""
    url = gw.settings.database_url
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = create_engine(url)
    try:
        with engine.connect() as pg:
            with pg.begin():
                if patient_id is not None:
                    pg.execute(text("SELECT 1 FROM patients WHERE id = :id FOR UPDATE"), {"id": patient_id})
                if asset_id is not None:
                    pg.execute(text("SELECT 1 FROM assets WHERE id = :id FOR UPDATE"), {"id": asset_id})
                yield
    finally:
        engine.dispose()


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_gateway_outlives_its_test(gw) -> Iterator[None]:
    """A test that fails before its kill or stop must not leave a gateway running on the next test's ports and
    database (PostgreSQL would wait on its connections to drop the schema: hence after `gw`, so torn down first)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


class Serve:
    """`clinphoto serve` on the test's store (DICOM door only), its log in a file."""

    def __init__(self, gw: Gateway, tmp_path: Path, name: str, wait: bool = True) -> None:
        from tests.test_serve import CLI, REPO, gateway_env

        config = tmp_path / "clinphoto.yaml"
        config.write_text(json.dumps({"auth": {"dicom_peers": [
            {"ae_title": "CAMERA", "hosts": ["127.0.0.1"], "allow": ["echo", "store"]}]}}))
        env = gateway_env(tmp_path, CLINPHOTO_CONFIG=str(config), CLINPHOTO_DATA_DIR=str(tmp_path),
                          CLINPHOTO_DATABASE_URL=gw.settings.database_url, CLINPHOTO_BLOB_DIR=str(gw.settings.blob_dir),
                          CLINPHOTO_LISTENERS='["dicom"]')
        self.port = int(env["CLINPHOTO_DICOM_PORT"])
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _STARTED.append(self.proc)
        if not wait:
            return
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "serve did not listen in time"
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0, self.log.read_text()[-2000:]


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def expected_renditions(gw: Gateway, path: Path) -> tuple[str, str]:
    """The preview and thumbnail blob names a make of this object gives (rendered here, nothing stored)."""
    import hashlib

    rends = received.renditions(received.read(path, gw.settings.ingest), gw.settings.ingest, tmp_dir=gw.spool.path)
    return hashlib.sha256(rends.preview).hexdigest(), hashlib.sha256(rends.thumbnail).hexdigest()


def slow_object(tmp_path: Path, name: str, seed: int) -> Path:
    """An uncompressed 12-MP photo: its reduction takes a renderer long enough (~0.5 s) to hold a lock meanwhile."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, size=(3000, 4000, 3), dtype=np.uint8)
    return objects.native(tmp_path / name, pixels)


def tries(gw: Gateway, asset_id: str) -> int:
    with gw.db.read() as s:
        return int(s.execute(select(Asset.rendition_tries).where(Asset.id == asset_id)).scalar_one())


def due_photo_blocked_in_renderers(gw: Gateway, fx, tmp_path: Path, serves: int) -> tuple[list[Serve], str, tuple[str, str], contextlib.ExitStack]:
    """`serves` gateways running, one due photo that a renderer has taken (its attempt counted), rendered and
    written, stopped at the commit that would record it; another gateway's renderer meets the held row when it
    takes the photo. (A renderer may make the photo before the commit is held: then again with another photo.)"""
    patient = add_patient(gw)
    running = [Serve(gw, tmp_path, f"serve{i}") for i in range(serves)]
    for attempt in range(5):
        sent = slow_object(tmp_path, f"due{attempt}.dcm", attempt)
        preview, thumbnail = expected_renditions(gw, sent)
        asset_id = receive(gw, sent).photos[0].asset_id
        wait_for(lambda asset_id=asset_id: tries(gw, asset_id) > 0)  # taken: counted before the decode
        stack = contextlib.ExitStack()
        stack.enter_context(holding_commit(gw, patient_id=patient["id"], asset_id=asset_id))
        if load(gw, asset_id).rendition_state != DUE:  # a renderer was quicker than the lock
            stack.close()
            continue
        names = (preview, thumbnail)
        try:
            wait_for(lambda names=names: all(gw.blobs.exists(n) for n in names))
        except BaseException:
            stack.close()  # the held row would keep the schema from being dropped
            raise
        return running, asset_id, names, stack
    raise AssertionError("the renderers always made the photo before the commit could be held")


def test_serve_killed_mid_render_leaves_the_photo_due_and_no_orphan_once_made(gw, fx, tmp_path):
    """kill -9 after the preview blobs are written, before the row names them: the photo is still due (never a row
    naming blobs that are not there), and the next start makes it with the same blobs: nothing left orphaned."""
    (serve,), asset_id, blobs, held = due_photo_blocked_in_renderers(gw, fx, tmp_path, 1)
    with held:
        serve.kill()
    asset = load(gw, asset_id)
    assert asset.rendition_state == DUE and asset.preview_sha256 is None
    assert deferred.due(gw) == [asset_id]
    again = Serve(gw, tmp_path, "restart")
    try:
        wait_for(lambda: not deferred.due(gw))
    finally:
        again.stop()
    asset = load(gw, asset_id)
    assert (asset.preview_sha256, asset.thumbnail_sha256) == blobs and asset.rendition_state is None
    clean_store(gw)
    chain_ok(gw)


def test_two_gateways_rendering_the_same_photo_record_it_once_and_keep_its_blobs(gw, fx, tmp_path):
    """Two processes on one store both render a due photo and both reach the commit: one records it, the other
    finds it done; the blobs the row names are there and nothing is audited as failed."""
    running, asset_id, blobs, held = due_photo_blocked_in_renderers(gw, fx, tmp_path, 2)
    try:
        with held:
            time.sleep(6)  # the second renderer's poll (5 s) has found the photo and rendered it too
        wait_for(lambda: not deferred.due(gw))
        time.sleep(1)  # the loser's look at the row and its clean-up
    finally:
        for serve in running:
            serve.stop()
    asset = load(gw, asset_id)
    assert (asset.preview_sha256, asset.thumbnail_sha256) == blobs and asset.rendition_state is None
    assert all(gw.blobs.exists(sha) for sha in blobs)
    assert not events(gw, outcome=audit.SERIOUS_FAILURE)
    clean_store(gw)
    for serve in running:
        assert "Traceback" not in serve.log.read_text()


def test_serve_killed_between_the_link_and_the_commit_stores_nothing_and_the_resend_is_clean(gw, fx, tmp_path):
    """A C-STORE whose object is linked into the blob store when the process dies before the commit: the sender
    got no Success, no row exists, the spooled copy is tidied at the next start, and the sender's retry is stored
    (the linked blob adopted again, not a second copy), made, and leaves the store clean."""
    from tests.test_dicom_store import storescu

    patient = add_patient(gw)
    sent = good_object(tmp_path, fx, "sent.dcm")
    serve = Serve(gw, tmp_path, "serve")
    tool = shutil.which("storescu")
    if tool is None:
        pytest.fail("storescu (dcmtk) is needed")
    with holding_commit(gw, patient_id=patient["id"]):
        sender = subprocess.Popen([tool, "-xy", "-aet", "CAMERA", "-aec", "CLINPHOTO", "127.0.0.1", str(serve.port), str(sent)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _STARTED.append(sender)
        # linked: the commit is all that is left (the file meta is the association's, so its name is learnt here)
        wait_for(lambda: any(gw.blobs.iter_blobs()))
        (sha,) = [b.sha256 for b in gw.blobs.iter_blobs()]
        spooled = [p for p in (tmp_path / "spool").rglob("*.dcm")]
        assert spooled and os.stat(spooled[0]).st_ino == os.stat(gw.blobs.path(sha)).st_ino
        serve.kill()
    said = sender.communicate(timeout=60)[0]
    assert sender.returncode != 0 or "Success" not in said  # never acknowledged
    with gw.db.read() as s:
        assert s.execute(select(Asset)).first() is None  # no partial asset
    assert gw.blobs.check(sha)  # the orphan is whole (gc's to remove, or the retry's)
    chain_ok(gw)

    again = Serve(gw, tmp_path, "restart")
    try:
        assert not list((tmp_path / "spool").rglob("*.dcm")), "the dead process's spooled object is still there"
        run = storescu(again.port, "CAMERA", sent)
        assert run.returncode == 0, run.stderr
        wait_for(lambda: not deferred.due(gw))
    finally:
        again.stop()
    with gw.db.read() as s:
        (asset,) = s.execute(select(Asset)).scalars().all()
        s.expunge(asset)
    assert asset.dicom_sha256 == sha and asset.rendition_state is None and asset.preview_sha256
    assert gw.blobs.check(sha)
    clean_store(gw)
    chain_ok(gw)


# --- the doors ------------------------------------------------------------------------------------------------


def _in_series(path: Path, study: str, series: str, number: int) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_series_whose_first_instance_did_not_decode_still_has_a_thumbnail(gw, fx, tmp_path):
    """STOW-RS stores two instances of one series, answered before rendering; the first turns out damaged
    inside. The series and study thumbnails stand for what the caller may see: the instance that has one,
    not a 404 because the first in order has none."""
    from gateway.app import create_app
    from tests.test_dicomweb import mi, stow
    from tests.test_photos_api import serving

    add_patient(gw)
    study, series = "1.2.826.0.9.7", "1.2.826.0.9.7.1"
    bad = _in_series(damaged_inside(tmp_path, fx), study, series, 1)
    good = _in_series(good_object(tmp_path, fx), study, series, 2)
    with serving(create_app(gw)) as web:
        stored = stow(web, gw, [("application/dicom", p.read_bytes(), {}) for p in (bad, good)])
        assert stored.status_code == 200, stored.text
        assert len(deferred.due(gw)) == 2  # answered before rendering
        h = mi(gw)
        rendered = web.get(f"/dicomweb/studies/{study}/series/{series}/rendered",
                           headers={**h, "Accept": 'multipart/related; type="image/jpeg"'})
        assert rendered.status_code == 200  # made on asking: the damaged one left out, the good one there
        for url in (f"/dicomweb/studies/{study}/series/{series}/thumbnail", f"/dicomweb/studies/{study}/thumbnail"):
            thumb = web.get(url, headers=h)
            assert thumb.status_code == 200, (url, thumb.status_code, thumb.text[:200])
            assert thumb.headers["content-type"] == "image/jpeg"


CRASHES = 3


def family(pid: int) -> list[int]:
    """`pid` and every process descended from it (the renderer's worker processes, under its forkserver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill_while_open(proc: subprocess.Popen, path: Path, seconds: float = 60.0) -> list[int]:
    """SIGKILL the gateway the moment it, or one of its renderer's worker processes, has `path` open (decoding a
    stored object's pixels); the gateway's descendants at that moment."""
    target = str(path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None
        pids = family(proc.pid)
        for pid in pids:
            fds = Path(f"/proc/{pid}/fd")
            with contextlib.suppress(OSError):
                for fd in os.listdir(fds):
                    with contextlib.suppress(OSError):
                        if os.readlink(fds / fd) == target:
                            proc.send_signal(signal.SIGKILL)
                            proc.wait(30)
                            return pids[1:]
        time.sleep(0.002)
    raise AssertionError(f"the process never opened {path}")


def gone(pid: int) -> bool:
    """Exited (or a zombie nobody waits for: its parent is gone too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_photo_the_renderer_dies_on_is_not_taken_up_again_at_every_start(gw, fx, tmp_path):
    import numpy as np

    add_patient(gw)
    pixels = np.random.default_rng(7).integers(0, 255, size=(3000, 4000, 3), dtype=np.uint8)  # ~0.5 s to reduce
    asset_id = receive(gw, objects.native(tmp_path / "poison.dcm", pixels)).photos[0].asset_id
    blob = gw.blobs.path(load(gw, asset_id).dicom_sha256)
    for attempt in range(CRASHES):  # the gateway dies while this photo is decoded (the OOM killer, a kill -9)
        serve = Serve(gw, tmp_path, f"crash{attempt}", wait=False)
        workers = kill_while_open(serve.proc, blob)
        assert load(gw, asset_id).rendition_state == DUE
        # its renderer's worker processes die with it, not left waiting for work for good
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(pid) for pid in workers), [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in workers if not gone(p)]
    serve = Serve(gw, tmp_path, "after")
    try:
        deadline = time.monotonic() + 60  # a renderer round and a poll, however loaded the machine
        while load(gw, asset_id).rendition_state != FAILED and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # and a while after: nothing more is tried
    finally:
        serve.stop()
    assert load(gw, asset_id).rendition_state == FAILED  # given up on after CRASHES deaths, not a crash loop
    assert [e.entities[0]["id"] for e in events(gw, outcome=audit.SERIOUS_FAILURE)] == [asset_id]


def test_a_decoder_crash_takes_its_worker_process_not_the_gateway(gw, fx, tmp_path, monkeypatch):
    """The decode runs in the renderer's worker processes: one dying on a photo (as a native decoder crash would)
    fails that attempt only. The photo is given up on after MAX_ATTEMPTS, audited; the renderer carries on with a
    new pool and makes the next photo's renditions."""
    from tests.crashing_decoder import POISON_ROWS, crash_on_poison

    monkeypatch.setattr(deferred, "RETRY_PAUSE", timedelta(0))  # no pause between attempts: the test's time
    add_patient(gw)
    poison = receive(gw, objects.native(tmp_path / "poison.dcm", objects.gradient(POISON_ROWS, 120))).photos[0].asset_id
    good = receive(gw, objects.native(tmp_path / "good.dcm", objects.gradient(96, 120))).photos[0].asset_id
    renderer = deferred.Renderer(gw, poll_seconds=0.2, threads=1, worker=crash_on_poison)
    renderer.start()
    try:
        deadline = time.monotonic() + 120
        while deferred.due(gw, limit=10) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert renderer.running
    finally:
        renderer.stop()
    assert load(gw, poison).rendition_state == FAILED and load(gw, poison).rendition_tries == deferred.MAX_ATTEMPTS + 1
    assert load(gw, good).rendition_state is None and load(gw, good).preview_sha256
    assert [e.entities[0]["id"] for e in events(gw, outcome=audit.SERIOUS_FAILURE)] == [poison]
    clean_store(gw)


# --- a resend of a photo whose pixels did not decode --------------------------------------------------------


def resend_of(damaged: Path, tmp_path: Path, fx, name: str = "intact.dcm", **keys: str) -> Path:
    """The intact object again under the damaged one's SOP Instance UID (and study, series, patient), as the
    sender sends it again; `keys` change attributes of the resend."""
    import pydicom

    intact = good_object(tmp_path, fx, name)
    ds, sent = pydicom.dcmread(intact), pydicom.dcmread(damaged)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = sent.SOPInstanceUID
    for key, value in keys.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(intact, enforce_file_format=True)
    return intact


def failed_photo(gw: Gateway, tmp_path: Path, fx) -> tuple[Path, Asset]:
    damaged = damaged_inside(tmp_path, fx)
    asset_id = receive(gw, damaged).photos[0].asset_id
    assert deferred.make(gw, asset_id).state == FAILED
    return damaged, load(gw, asset_id)


def referenced(gw: Gateway, sha: str) -> bool:
    with gw.db.read() as s:
        return any(s.scalar(select(column).where(column == sha).limit(1)) for column in
                   (Asset.sha256, Asset.dicom_sha256, Asset.preview_sha256, Asset.thumbnail_sha256))


def test_an_intact_resend_of_an_instance_whose_pixels_did_not_decode_is_stored(gw, fx, tmp_path, caplog):
    """The known-bad copy does not block its own correction: the resend replaces the asset's object in place (same
    id, patient, study, series, governance, consent links, created_at), renditions are made again, the superseded
    object is gone once nothing names it, and the replacement is in the trail with both hashes."""
    from gateway.core.consents import record_consent

    caplog.set_level(logging.DEBUG)
    patient = add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    with gw.db.write() as s:  # what medical illustration and the consent API did meanwhile: kept
        s.get_one(Asset, before.id).sensitivity = "R"
        consent = record_consent(s, patient_id=patient["id"], level="teaching", given_by="patient",
                                 captured_by="mi.jones", scope="photos", asset_ids=[before.id]).id
    intact = resend_of(damaged, tmp_path, fx)
    again = receive(gw, intact).photos[0]
    assert (again.status, again.asset_id, again.sop_instance_uid) == ("replaced", before.id, before.sop_instance_uid)
    after = load(gw, before.id)
    new_sha = hashlib.sha256(intact.read_bytes()).hexdigest()
    assert after.sha256 == after.dicom_sha256 == again.sha256 == new_sha != before.sha256
    assert (after.rendition_state, after.rendition_tries, after.rendition_after) == (DUE, 0, None)
    assert (after.patient_id, after.filed_patient_id, after.study_uid, after.series_uid, after.created_at, after.sensitivity,
            after.source, after.uploaded_by) == (before.patient_id, before.filed_patient_id, before.study_uid,
                                                 before.series_uid, before.created_at, "R", before.source, before.uploaded_by)
    assert gw.blobs.path(after.dicom_sha256).read_bytes() == intact.read_bytes()
    assert after.size == after.dicom_size == intact.stat().st_size
    # the superseded object is named by nothing and gone: nothing for `store gc`, and the store is clean
    assert not referenced(gw, before.sha256) and not gw.blobs.exists(before.sha256)
    made = deferred.make(gw, again.asset_id)
    assert made.state is None and made.preview_sha256
    clean_store(gw)
    with gw.db.read() as s:
        from store.models import ConsentAsset

        assert s.scalar(select(ConsentAsset.asset_id).where(ConsentAsset.consent_id == consent)) == before.id
    # the same resend again (the sender retrying an answer it lost) is the stored object
    assert receive(gw, intact).photos[0].status == "existing"
    [replaced] = [e for e in events(gw, type_code=audit.IMPORT, action="U") if e.outcome == audit.SUCCESS]
    assert replaced.entities[0]["id"] == before.id and replaced.patient_id == patient["id"]
    assert (replaced.detail["replaced_sha256"], replaced.detail["sha256"]) == (before.sha256, after.sha256)
    assert replaced.agent_who == PEER.who
    chain_ok(gw)
    loud = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert patient["nhs"] not in loud and "Siobh" not in loud and "SENDER" not in loud


def test_a_correction_is_made_at_once_when_renditions_come_before_the_answer(gw, fx, tmp_path):
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    gw.settings.ingest.received_renditions = "before-answer"  # switched after the damaged copy was kept
    again = receive(gw, resend_of(damaged, tmp_path, fx)).photos[0]
    after = load(gw, before.id)
    assert again.status == "replaced" and after.rendition_state is None
    assert after.preview_sha256 and after.thumbnail_sha256 and after.preview_size
    clean_store(gw)


def test_a_resend_naming_another_patient_does_not_correct_a_failed_photo(gw, fx, tmp_path):
    """A correction never moves a photo between patients: the resend under the UID that names someone else is
    refused (the same rule as before), and nothing changes."""
    from gateway.core.ingest import errors
    from gateway.core.ingest.errors import IngestRejected

    add_patient(gw)
    add_patient(gw, nhs="9434765919", mrn="M200", visit="V200")
    damaged, before = failed_photo(gw, tmp_path, fx)
    blobs = {b.sha256 for b in gw.blobs.iter_blobs()}
    for name, keys in (("other.dcm", {"PatientID": "9434765919"}),
                       ("study.dcm", {"StudyInstanceUID": "1.2.826.0.9.77"}),
                       ("class.dcm", {"SOPClassUID": objects.DERMOSCOPY, "Modality": "DMS"})):
        with pytest.raises(IngestRejected) as refused:
            receive(gw, resend_of(damaged, tmp_path, fx, name, **keys))
        assert refused.value.code == errors.DUPLICATE_INSTANCE, name
    after = load(gw, before.id)
    assert (after.sha256, after.patient_id, after.rendition_state) == (before.sha256, before.patient_id, FAILED)
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == blobs
    assert not [e for e in events(gw, action="U") if e.outcome == audit.SUCCESS]


def test_other_content_under_the_uid_of_a_photo_that_decoded_or_is_due_is_still_a_duplicate(gw, fx, tmp_path):
    """Only a photo whose pixels are known not to decode is replaced: one that decoded (what readers have seen), or
    one not decoded yet, keeps its object and other content under its UID is refused."""
    from gateway.core.ingest import errors
    from gateway.core.ingest.errors import IngestRejected

    add_patient(gw)
    good = good_object(tmp_path, fx)
    decoded = receive(gw, good).photos[0]
    assert deferred.make(gw, decoded.asset_id).state is None
    due_path = good_object(tmp_path, fx, "due.dcm")
    pending = receive(gw, due_path).photos[0]
    for sent, photo in ((good, decoded), (due_path, pending)):
        with pytest.raises(IngestRejected) as refused:
            receive(gw, resend_of(sent, tmp_path, fx, f"other-{photo.asset_id}.dcm", ImageComments="other content"))
        assert refused.value.code == errors.DUPLICATE_INSTANCE
        assert load(gw, photo.asset_id).sha256 == photo.sha256
    assert load(gw, pending.asset_id).rendition_state == DUE
    clean_store(gw)


def test_a_correction_that_fails_to_commit_leaves_the_failed_photo_as_it_was(gw, fx, tmp_path, monkeypatch):
    """Nothing is acknowledged before the commit: a failure in the write transaction leaves the asset naming its old
    object (still stored) and removes the resend's blob."""
    from gateway.core.ingest import pipeline

    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(pipeline.audit, "append_many", broken)
    with pytest.raises(RuntimeError):
        receive(gw, resend_of(damaged, tmp_path, fx))
    monkeypatch.undo()
    after = load(gw, before.id)
    assert (after.sha256, after.rendition_state) == (before.sha256, FAILED)
    assert gw.blobs.exists(before.sha256)
    clean_store(gw)


def test_two_resends_at_once_correct_the_photo_once(gw, fx, tmp_path, monkeypatch):
    """A correction committed by another request between this one's look-up and its write: its update matches
    nothing, and one more pass answers as the store now is (the same object: existing)."""
    from gateway.core.ingest import pipeline

    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    intact = resend_of(damaged, tmp_path, fx)
    first_pass = pipeline._new_object_row
    raced: list[str] = []

    def meanwhile(*args, **kwargs):
        if not raced:
            raced.append("started")
            raced.append(receive(gw, intact).photos[0].status)  # the other request, done before this one writes
        return first_pass(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_new_object_row", meanwhile)
    again = receive(gw, intact).photos[0]
    assert raced == ["started", "replaced"] and (again.status, again.asset_id) == ("existing", before.id)
    assert len([e for e in events(gw, action="U") if e.outcome == audit.SUCCESS]) == 1
    clean_store(gw)


def test_a_photo_met_while_the_spool_is_unusable_is_made_once_it_is_back(gw, fx, tmp_path):
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    broken = tmp_path / "spool-volume"
    broken.write_bytes(b"")  # where the spool folder should be: the volume is not there
    gw.settings.ingest.spool_dir = broken
    away = Gateway(settings=gw.settings, db=gw.db, blobs=gw.blobs)
    for _ in range(deferred.MAX_ATTEMPTS + 1):  # the renderer's rounds during the fault
        with contextlib.suppress(Exception):
            deferred.make(away, asset_id)
    broken.unlink()
    back = Gateway(settings=gw.settings, db=gw.db, blobs=gw.blobs)
    try:
        made = deferred.make(back, asset_id)
    finally:
        back.spool.close()
    assert made.state is None and made.preview_sha256, made
    assert not events(gw, outcome=audit.SERIOUS_FAILURE)


def test_a_rendered_series_whose_make_fails_is_still_audited(gw, fx, tmp_path):
    """WADO-RS /rendered of a series makes its due instances on asking; when a make fails (here the spool it needs
    is unusable) the request fails, but the query and the failed retrieve are in the audit trail all the same."""
    from gateway.app import create_app
    from tests.test_dicomweb import mi
    from tests.test_photos_api import serving

    add_patient(gw)
    study, series = "1.2.826.0.9.8", "1.2.826.0.9.8.1"
    asset_id = receive(gw, _in_series(good_object(tmp_path, fx), study, series, 1)).photos[0].asset_id
    broken = tmp_path / "spool-volume"
    broken.write_bytes(b"")
    gw.settings.ingest.spool_dir = broken
    away = Gateway(settings=gw.settings, db=gw.db, blobs=gw.blobs)
    before = len(events(gw))
    with serving(create_app(away)) as web:
        r = web.get(f"/dicomweb/studies/{study}/series/{series}/rendered",
                    headers={**mi(gw), "Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code >= 500
    mine = [e for e in events(gw)[before:] if e.agent_who == "mi.jones"]
    assert any(e.type_code == audit.QUERY for e in mine), [(e.type_code, e.subtype, e.outcome) for e in mine]
    failed = [e for e in mine if any(x.get("id") == asset_id for x in e.entities) and e.outcome != audit.SUCCESS]
    assert failed, [(e.type_code, e.subtype, e.outcome) for e in mine]


def test_the_first_readers_make_is_audited_as_their_retrieve_and_nothing_else(gw, fx, tmp_path):
    """The on-demand make is the gateway's work done for a reader: the reader's record is one retrieve of that
    photo (what they were given), and nothing is recorded in their name for the making."""
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    before = len(events(gw))
    ctx = access.photo_request(gw, ILLUSTRATOR, "read", "test")
    stored = access.image(gw, ctx, asset_id, "thumbnail", "test")
    assert stored.path.is_file() and load(gw, asset_id).rendition_state is None
    after = events(gw)[before:]
    assert [(e.agent_who, e.action, e.subtype, e.outcome) for e in after] == [(ILLUSTRATOR.sub, "R", "retrieve", audit.SUCCESS)]
    assert after[0].entities[0]["id"] == asset_id and after[0].detail["rendition"] == "thumbnail"


def test_store_gc_meeting_a_linked_spool_file_before_its_commit_spares_it(gw, fx, tmp_path):
    """`clinphoto store gc` (default age) runs while a received object is linked into the store and its commit
    waits: the linked blob is young (its mtime is the spool write's), so it is spared and the commit names a blob
    that is there; the spooled name the door still holds is not the store's to touch."""
    from datetime import timedelta

    from store.integrity import collect_garbage, collect_spool

    patient = add_patient(gw)
    fd, spooled = gw.spool.new_file(prefix="cstore-", suffix=".dcm")
    os.close(fd)
    shutil.copyfile(good_object(tmp_path, fx), spooled)
    result: list[object] = []
    with holding_commit(gw, patient_id=patient["id"]):
        worker = threading.Thread(target=lambda: result.append(receive(gw, spooled, spooled=True)))
        worker.start()
        wait_for(lambda: any(gw.blobs.iter_blobs()))  # linked; the commit waits
        (linked,) = [b.sha256 for b in gw.blobs.iter_blobs()]
        assert collect_garbage(gw.db, gw.blobs, older_than=timedelta(hours=24), now=time.time()) == []
        assert collect_spool(gw.spool.root) == []  # a live process's spool folder
        assert spooled.exists() and gw.blobs.exists(linked)
    worker.join(60)
    (photo,) = result[0].photos  # type: ignore[attr-defined]
    spooled.unlink()
    assert load(gw, photo.asset_id).dicom_sha256 == linked and gw.blobs.check(linked)
    assert deferred.make(gw, photo.asset_id).state is None
    clean_store(gw)
