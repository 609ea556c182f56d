"""Received DICOM objects answered before their renditions are made (ingest.received_renditions), on both backends.

The sender is answered once the object passed every check that needs no decoding and is stored; the
preview and thumbnail are made afterwards by the renderer `serve` runs, or on first asking, and a frame
whose damage only decoding shows is marked failed and audited, its object kept as sent. The spooled
file a door wrote is linked into the blob store, not copied.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from PIL import Image
from sqlalchemy import select

from gateway.core import access
from gateway.core.identity import Subject
from gateway.core.ingest import deferred, errors
from gateway.core.ingest.digests import sha1_base64
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.renditions import DUE, FAILED
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from gateway.core.refusals import Kind, Refused
from store import audit
from store.models import Asset, AuditEvent
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient

PEER = Source.dicom_peer("MODALITY1", "10.1.2.3")
ILLUSTRATOR = Subject(sub="mi.jones", role="medical-illustration", scopes=("user/*.cruds",))


def receive(gw, path, spooled: bool = False):
    return ingest(gw, CaptureRequest(source=PEER, items=[ReceivedObject(path, filename=path.name, spooled=spooled)]))


def load(gw, asset_id: str) -> Asset:
    with gw.db.read() as s:
        row = s.get(Asset, asset_id)
        s.expunge(row)
        return row


def good_object(tmp_path, fx, name: str = "good.dcm"):
    return objects.jpeg_wrapped(tmp_path / name, fx["baseline_420.jpg"].read_bytes(), 640, 480)


def damaged_inside(tmp_path, fx):
    """Whole in form (header, scan, end-of-image) but half its entropy-coded data gone: only a decode can tell."""
    jpeg = fx["baseline_420.jpg"].read_bytes()
    return objects.jpeg_wrapped(tmp_path / "damaged.dcm", jpeg[: len(jpeg) // 2] + b"\xff\xd9", 640, 480)


def image_of(gw, asset_id: str, rendition: str = "preview") -> access.StoredImage:
    return access.image(gw, access.photo_request(gw, ILLUSTRATOR, "read", "test"), asset_id, rendition, "test")


@contextmanager
def attempt_held(gw, asset_id: str, *, background: bool) -> Iterator[threading.Event]:
    """An attempt at the photo's renditions under way on another thread, its decode held until the block ends or the
    event it yields is set (the renderer's worker given no CPU, or a slow reader)."""
    started, release = threading.Event(), threading.Event()

    def held(stored, settings, tmp_dir):
        started.set()
        assert release.wait(30)
        return deferred.read_and_render(stored, settings, tmp_dir)

    maker = threading.Thread(target=deferred.make, args=(gw, asset_id), kwargs={"render": held, "background": background})
    maker.start()
    try:
        assert started.wait(10)
        yield release
    finally:
        release.set()
        maker.join(30)


def test_the_answer_comes_before_the_renditions_and_the_first_reader_gets_them_made(gw, fx, tmp_path):
    add_patient(gw)
    assert gw.settings.ingest.received_renditions == "after-answer"  # the default
    photo = receive(gw, good_object(tmp_path, fx)).photos[0]
    asset = load(gw, photo.asset_id)
    assert photo.status == "created" and asset.rendition_state == DUE and asset.sha1 is None
    assert asset.preview_sha256 is None and asset.thumbnail_sha256 is None and asset.preview_size is None
    assert gw.renditions_wanted.is_set()  # the renderer is woken
    assert deferred.due(gw) == [asset.id]

    stored = image_of(gw, asset.id)  # made there and then, not "not ready"
    preview = Image.open(stored.path)
    assert preview.format == "JPEG" and preview.size == (640, 480)
    asset = load(gw, asset.id)
    assert asset.rendition_state is None and stored.path == gw.blobs.path(asset.preview_sha256)
    assert asset.preview_size == stored.path.stat().st_size and asset.preview_sha1
    assert asset.sha1 == sha1_base64(gw.blobs.path(asset.dicom_sha256))  # the object's, left to this moment
    assert Image.open(image_of(gw, asset.id, "thumbnail").path).size == (256, 192)
    assert deferred.due(gw) == []
    assert deferred.make(gw, asset.id).state is None  # made once: asking again changes nothing
    assert load(gw, asset.id).preview_sha256 == asset.preview_sha256


def test_the_renderer_thread_makes_what_is_due_soon_after_the_answer(gw, fx, tmp_path):
    add_patient(gw)
    renderer = deferred.Renderer(gw, poll_seconds=30)  # woken by the ingest, not by its poll
    renderer.start()
    try:
        ids = [receive(gw, good_object(tmp_path, fx)).photos[0].asset_id]
        other = objects.native(tmp_path / "native.dcm", objects.gradient(300, 400))
        ids.append(receive(gw, other).photos[0].asset_id)
        deadline = time.monotonic() + 60
        while deferred.due(gw) and time.monotonic() < deadline:
            time.sleep(0.05)
        for asset_id in ids:
            asset = load(gw, asset_id)
            assert asset.rendition_state is None and gw.blobs.exists(asset.preview_sha256)
            assert gw.blobs.exists(asset.thumbnail_sha256)
        with Image.open(gw.blobs.path(load(gw, ids[1]).preview_sha256)) as preview:
            assert preview.size == (400, 300)
            assert preview.convert("RGB").getpixel((200, 150))[0] > 200  # the red square: samples read in order
    finally:
        renderer.stop()
    assert not renderer.running


class Sender:
    """A camera sending photos one after another, `gap` seconds apart, on a thread, until stopped."""

    def __init__(self, gw, fx, tmp_path, gap: float = 0.1) -> None:
        self.gw, self.fx, self.tmp_path, self.gap = gw, fx, tmp_path, gap
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send)

    def _send(self) -> None:
        while not self._stop.is_set():
            path = good_object(self.tmp_path, self.fx, f"burst{len(self.sent)}.dcm")
            self.sent.append(receive(self.gw, path).photos[0].asset_id)
            self._stop.wait(self.gap)

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def renderer_running(gw, **settings) -> Iterator[deferred.Renderer]:
    """`clinphoto serve`'s renderer on this gateway, woken by its ingests (not by its poll), stopped at the end."""
    renderer = deferred.Renderer(gw, poll_seconds=30, **settings)
    renderer.start()
    try:
        yield renderer
    finally:
        renderer.stop()


def _wait_made(gw, asset_ids: list[str], seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(load(gw, a).rendition_state is None for a in asset_ids):
            return True
        time.sleep(0.05)
    return False


def test_the_renderer_gives_way_to_senders_and_makes_their_photos_once_they_pause(gw, fx, tmp_path):
    """While photos keep arriving no rendition is started (they compete with the answers for this process); the
    burst's photos are made once the senders have been quiet for `quiet_seconds`."""
    add_patient(gw)
    with renderer_running(gw, quiet_seconds=1.5, max_deferral=60), Sender(gw, fx, tmp_path) as sender:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            time.sleep(0.05)
            assert all(load(gw, a).rendition_state == DUE for a in list(sender.sent))
        assert len(sender.sent) >= 3
        sender.stop()
        stopped = time.monotonic()
        assert _wait_made(gw, sender.sent)
        assert time.monotonic() - stopped >= 1.0  # not before the quiet spell (less what the last ingest took)
        for asset_id in sender.sent:
            assert gw.blobs.exists(load(gw, asset_id).preview_sha256)


def test_the_renderer_gives_way_for_max_deferral_at_most_to_senders_that_never_pause(gw, fx, tmp_path):
    add_patient(gw)
    with renderer_running(gw, quiet_seconds=1.5, max_deferral=1.0), Sender(gw, fx, tmp_path) as sender:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not sender.sent or load(gw, sender.sent[0]).rendition_state == DUE):
            time.sleep(0.05)
        first = load(gw, sender.sent[0])  # made while the photos kept coming
        assert first.rendition_state is None and gw.blobs.exists(first.preview_sha256)
        sender.stop()
        assert _wait_made(gw, sender.sent)


def _arrives(gw) -> None:
    """An ingest begun and refused at once (no files): to the renderer, a sender waiting all the same."""
    with pytest.raises(IngestRejected):
        ingest(gw, CaptureRequest(source=PEER, items=[]))


def test_a_pause_the_renderer_did_not_see_ends_its_giving_way(gw):
    """A burst longer than max_deferral: the renderer takes photos as they come. The senders pause (longer than
    quiet_seconds) while every renderer thread is rendering or waiting for work, so none looks; the next burst is
    given way to again, as it would have been had one looked (its giving way does not date from the first burst)."""
    # seconds, not tenths: a loaded machine's stall between two steps must not pass for the senders' pause
    renderer = deferred.Renderer(gw, poll_seconds=30, quiet_seconds=1.0, max_deferral=2.0)
    deadline = time.monotonic() + 30
    while True:  # the first burst, the renderer looking between its photos, until past max_deferral
        _arrives(gw)
        if renderer._give_way() == 0.0:  # photos are taken as they come
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.5)  # the pause, unseen
    _arrives(gw)  # the next burst
    renderer._give_way()  # at most one photo (the pause counts as if seen: senders were quiet)
    assert renderer._give_way() > 0  # then it gives way to the new burst


def test_the_renderer_gives_way_to_an_ingest_longer_than_quiet_seconds(gw, fx, tmp_path, monkeypatch):
    """A request of many photos, each checked and stored before the answer, takes longer than quiet_seconds: its
    sender waits all along, and the renderer gives way all along (not only near its start and its end)."""
    from gateway.core.ingest import pipeline

    add_patient(gw)
    renderer = deferred.Renderer(gw, poll_seconds=30, quiet_seconds=0.2, max_deferral=60)
    waits: list[float] = []
    store = pipeline._store

    def slow_store(*args, **kwargs):
        time.sleep(0.4)
        waits.append(renderer._give_way())
        return store(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_store", slow_store)
    receive(gw, good_object(tmp_path, fx))
    assert waits and waits[0] > 0


def test_no_ingest_leaves_the_renderer_giving_way_once_it_ended(gw, fx, tmp_path, monkeypatch):
    """Refused at once, refused in its checks, failed while storing, replayed by its Idempotency-Key, stored: once each
    has ended and senders are quiet, the renderer takes photos again."""
    from gateway.core.ingest import pipeline

    add_patient(gw)
    renderer = deferred.Renderer(gw, poll_seconds=30, quiet_seconds=1.0, max_deferral=60)

    def quiet_after(ingest_one) -> None:
        ingest_one()
        assert renderer._give_way() > 0  # just now: a sender waited
        time.sleep(1.3)
        assert renderer._give_way() == 0.0

    quiet_after(lambda: _arrives(gw))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    quiet_after(lambda: pytest.raises(IngestRejected, receive, gw, junk))
    path = good_object(tmp_path, fx)
    keyed = CaptureRequest(source=PEER, items=[ReceivedObject(path, filename=path.name)], idempotency_key="k1")
    quiet_after(lambda: ingest(gw, keyed))
    quiet_after(lambda: ingest(gw, keyed).replayed or pytest.fail("not replayed"))

    def failing_store(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(pipeline, "_store", failing_store)
    quiet_after(lambda: pytest.raises(RuntimeError, receive, gw, good_object(tmp_path, fx, "other.dcm")))


def test_a_frame_damaged_inside_is_kept_as_sent_marked_failed_and_audited(gw, fx, tmp_path):
    add_patient(gw)
    sent = damaged_inside(tmp_path, fx)
    photo = receive(gw, sent).photos[0]  # the sender is told it is stored: it is, byte for byte
    assert photo.status == "created"
    made = deferred.make(gw, photo.asset_id)
    assert made.state == FAILED and "decode" in made.reason
    asset = load(gw, photo.asset_id)
    assert asset.rendition_state == FAILED and asset.preview_sha256 is None
    assert gw.blobs.read_bytes(asset.dicom_sha256) == sent.read_bytes()
    assert asset.sha1 == sha1_base64(sent)  # served as sent, so described with its hash all the same
    assert not deferred.available(asset) and deferred.due(gw) == []
    with gw.db.read() as s:
        failed = s.execute(select(AuditEvent).where(AuditEvent.outcome == audit.SERIOUS_FAILURE)).scalars().one()
        s.expunge(failed)
    assert (failed.type_code, failed.action, failed.subtype, failed.patient_id) == (audit.IMPORT, "U", "dimse", asset.patient_id)
    assert failed.detail["code"] == errors.CORRUPT and failed.entities[0]["id"] == asset.id
    assert "Siobh" not in failed.outcome_desc  # the finding, not the patient
    with pytest.raises(Refused) as refused:
        image_of(gw, asset.id)
    assert refused.value.kind == Kind.NOT_FOUND and "did not decode" in refused.value.reason
    # the DICOM object is still served as the sender sent it, as any archive would
    ctx = access.photo_request(gw, ILLUSTRATOR, "read", "test")
    assert access.dicom_object(gw, ctx, asset.id).served.read()
    assert deferred.make(gw, asset.id).state == FAILED  # decided once: not audited again
    with gw.db.read() as s:
        assert len(s.execute(select(AuditEvent).where(AuditEvent.outcome == audit.SERIOUS_FAILURE)).scalars().all()) == 1


def test_before_the_answer_a_frame_damaged_inside_is_refused_and_nothing_stored(gw, fx, tmp_path):
    add_patient(gw)
    gw.settings.ingest.received_renditions = "before-answer"
    with pytest.raises(IngestRejected) as refused:
        receive(gw, damaged_inside(tmp_path, fx))
    assert refused.value.code == errors.CORRUPT
    photo = receive(gw, good_object(tmp_path, fx)).photos[0]
    asset = load(gw, photo.asset_id)
    assert asset.rendition_state is None and gw.blobs.exists(asset.preview_sha256)
    assert not gw.renditions_wanted.is_set()


def test_a_frame_cut_short_is_refused_at_once_in_either_mode(gw, fx, tmp_path):
    add_patient(gw)
    jpeg = fx["baseline_420.jpg"].read_bytes()
    cut = objects.jpeg_wrapped(tmp_path / "cut.dcm", jpeg[: len(jpeg) * 2 // 3 & ~1], 640, 480)
    for mode in ("after-answer", "before-answer"):
        gw.settings.ingest.received_renditions = mode
        with pytest.raises(IngestRejected) as refused:
            receive(gw, cut)
        assert refused.value.code == errors.CORRUPT and "end-of-image" in refused.value.message, mode
    with gw.db.read() as s:
        assert s.execute(select(Asset)).first() is None


def test_a_spooled_object_is_linked_into_the_store_and_a_callers_file_is_copied(gw, fx, tmp_path):
    add_patient(gw)
    spooled = good_object(tmp_path, fx, "spooled.dcm")
    data = spooled.read_bytes()
    asset = load(gw, receive(gw, spooled, spooled=True).photos[0].asset_id)
    blob = gw.blobs.path(asset.dicom_sha256)
    assert os.stat(blob).st_ino == os.stat(spooled).st_ino  # one file, two names: no second write of 3 MB
    spooled.unlink()  # what the door does next
    assert blob.read_bytes() == data and gw.blobs.check(asset.dicom_sha256)

    own = objects.img2dcm(fx["baseline_420.jpg"], tmp_path / "own.dcm", PatientID="9449305552", IssuerOfPatientID="NHS")
    asset = load(gw, receive(gw, own).photos[0].asset_id)
    assert os.stat(gw.blobs.path(asset.dicom_sha256)).st_ino != os.stat(own).st_ino
    assert gw.blobs.read_bytes(asset.dicom_sha256) == own.read_bytes()


def test_a_failed_ingest_removes_the_linked_blob_and_leaves_the_spooled_file(gw, fx, tmp_path):
    """All or nothing holds for linked files: a refusal after the link removes the blob's name, never the door's."""
    add_patient(gw)
    first = good_object(tmp_path, fx, "first.dcm")
    bad = objects.jpeg_wrapped(tmp_path / "bad.dcm", fx["baseline_420.jpg"].read_bytes(), 800, 480)  # not its size
    before = {b.sha256 for b in gw.blobs.iter_blobs()}
    with pytest.raises(IngestRejected):
        ingest(gw, CaptureRequest(source=PEER, items=[ReceivedObject(first, spooled=True), ReceivedObject(bad, spooled=True)]))
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == before and first.exists()
    with io.BytesIO(first.read_bytes()) as f:
        assert f.read(132)[128:] == b"DICM"


def test_serve_renders_what_a_stopped_process_left_and_what_storescu_sends(gw, fx, tmp_path):
    """The wiring: `clinphoto serve` starts the renderer, which makes what was left due (a process stopped or killed
    before rendering leaves exactly this) and what dcmtk's storescu sends it, soon after each answer."""
    import json
    import signal
    import socket
    import subprocess

    from tests.test_dicom_store import storescu
    from tests.test_serve import CLI, REPO, gateway_env

    add_patient(gw)
    left = [receive(gw, good_object(tmp_path, fx, f"left{i}.dcm")).photos[0].asset_id for i in range(2)]
    assert sorted(deferred.due(gw)) == sorted(left)
    config = tmp_path / "clinphoto.yaml"
    config.write_text(json.dumps({"auth": {"dicom_peers": [{"ae_title": "CAMERA", "hosts": ["127.0.0.1"], "allow": ["echo", "store"]}]}}))
    env = gateway_env(tmp_path, CLINPHOTO_CONFIG=str(config), CLINPHOTO_DATA_DIR=str(tmp_path),
                      CLINPHOTO_DATABASE_URL=gw.settings.database_url, CLINPHOTO_BLOB_DIR=str(gw.settings.blob_dir),
                      CLINPHOTO_LISTENERS='["dicom"]')
    port = int(env["CLINPHOTO_DICOM_PORT"])
    proc = subprocess.Popen([*CLI, "serve"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        sent = objects.jpeg_wrapped(tmp_path / "sent.dcm", fx["baseline_420.jpg"].read_bytes(), 640, 480)
        run = storescu(port, "CAMERA", sent)
        assert run.returncode == 0, run.stderr
        while time.monotonic() < deadline and (deferred.due(gw) or len(_made(gw)) < 3):
            time.sleep(0.05)
        made = _made(gw)
        assert len(made) == 3 and set(left) <= {a.id for a in made}
        for asset in made:
            assert Image.open(gw.blobs.path(asset.preview_sha256)).size == (640, 480)
            assert asset.sha1 == sha1_base64(gw.blobs.path(asset.dicom_sha256))  # hashed by a worker process
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]


def _made(gw) -> list[Asset]:
    with gw.db.read() as s:
        rows = list(s.scalars(select(Asset).where(Asset.rendition_state.is_(None), Asset.preview_sha256.is_not(None))))
        s.expunge_all()
        return rows


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="scheduling policies are Linux's")
def test_rendition_workers_run_at_the_idle_policy_as_children_of_the_gateway():
    """The renderer's worker processes give way to answering senders at once (SCHED_IDLE, not nice 19), as the
    renderer starts them (spawned, with its initializer)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=deferred._worker_start,
                             initargs=(os.getpid(),)) as pool:
        assert pool.submit(os.sched_getscheduler, 0).result(60) == os.SCHED_IDLE
        assert pool.submit(os.getppid).result(60) == os.getpid()


def test_renditions_are_made_where_the_database_has_no_update_returning(gw, fx, tmp_path, monkeypatch):
    """SQLite before 3.35 has no UPDATE ... RETURNING (SQLAlchemy's dialect says so): the attempt is claimed, and the
    row read back, in one write transaction instead."""
    add_patient(gw)
    photo = receive(gw, good_object(tmp_path, fx)).photos[0]
    monkeypatch.setattr(gw.db.engine.dialect, "update_returning", False)
    made = deferred.make(gw, photo.asset_id)
    assert made.state is None and made.preview_sha256
    asset = load(gw, photo.asset_id)
    assert asset.rendition_state is None and asset.rendition_tries == 1
    assert asset.sha1 == sha1_base64(gw.blobs.path(asset.dicom_sha256))
    assert deferred.make(gw, photo.asset_id).preview_sha256 == made.preview_sha256  # not due: nothing claimed again
    assert load(gw, photo.asset_id).rendition_tries == 1


def test_readers_wait_briefly_for_the_renderers_attempt_then_one_of_them_makes_the_renditions(gw, fx, tmp_path, monkeypatch):
    """The renderer's workers run at the idle policy: with the CPUs kept busy by senders they may not run for a long
    time. A reader (a viewer asking for a thumbnail) waits for the renderer's attempt READER_PATIENCE at most, then
    makes the renditions itself; the readers that come meanwhile wait for that one instead of each making them
    again. The row is updated once: the renderer's attempt, finishing later, changes nothing."""
    monkeypatch.setattr(deferred, "READER_PATIENCE", 0.3)
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    with attempt_held(gw, asset_id, background=True):
        results: list[deferred.Made] = []
        readers = [threading.Thread(target=lambda: results.append(deferred.make(gw, asset_id))) for _ in range(5)]
        began = time.monotonic()
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(30)
        waited = time.monotonic() - began
    assert len(results) == 5 and all(r.state is None and r.preview_sha256 for r in results)
    assert len({r.preview_sha256 for r in results}) == 1 and waited < 10
    asset = load(gw, asset_id)
    assert asset.rendition_state is None and asset.preview_sha256 == results[0].preview_sha256
    assert asset.rendition_tries == 1  # the renderer's claim counted the round; the readers' attempt beside it is not
    assert gw.blobs.exists(asset.preview_sha256) and gw.blobs.exists(asset.thumbnail_sha256)


def test_the_renderer_waits_for_a_readers_attempt_rather_than_overtaking_it(gw, fx, tmp_path, monkeypatch):
    monkeypatch.setattr(deferred, "READER_PATIENCE", 0.1)
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    with attempt_held(gw, asset_id, background=False) as release:  # a reader's
        threading.Timer(0.5, release.set).start()
        made = deferred.make(gw, asset_id, background=True)  # waits for the reader's, past READER_PATIENCE
    assert made.state is None and made.preview_sha256
    assert load(gw, asset_id).rendition_tries == 1


def test_a_reader_overtaking_the_renderers_last_allowed_attempt_does_not_give_the_photo_up(gw, fx, tmp_path, monkeypatch):
    """Two attempts ended without an answer (a restart during the decode); the renderer's third is under way when a
    reader overtakes it. Counted as a fourth, the reader's attempt gave the photo up (failed, audited "ended without
    an answer 3 times") while the renderer's went on to succeed and was thrown away (found by review)."""
    from sqlalchemy import update

    monkeypatch.setattr(deferred, "READER_PATIENCE", 0.2)
    add_patient(gw)
    asset_id = receive(gw, good_object(tmp_path, fx)).photos[0].asset_id
    with gw.db.write() as s:
        s.execute(update(Asset).where(Asset.id == asset_id).values(rendition_tries=2))
    with attempt_held(gw, asset_id, background=True):  # the renderer's third, its worker given no CPU
        made = deferred.make(gw, asset_id)
    asset = load(gw, asset_id)
    assert made.state is None and made.preview_sha256 == asset.preview_sha256
    assert asset.rendition_state is None and asset.rendition_tries == 3
    with gw.db.read() as s:
        assert not s.scalars(select(AuditEvent).where(AuditEvent.outcome == audit.SERIOUS_FAILURE)).all()
