import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.blobs import BlobCorrupt, BlobNotFound, FileBlobStore
from store.integrity import check_store, collect_garbage
from store.models import Asset, Patient

REPO = Path(__file__).resolve().parent.parent


def test_put_is_content_addressed_and_deduplicated(blobs):
    a = blobs.put_bytes(b"photo bytes")
    b = blobs.put_stream([b"photo ", b"bytes"])
    assert a == b
    assert a.sha256 == hashlib.sha256(b"photo bytes").hexdigest() and a.size == 11
    path = blobs.path(a.sha256)
    assert path.parent.name == a.sha256[2:4] and path.parent.parent.name == a.sha256[:2]
    assert blobs.read_bytes(a.sha256) == b"photo bytes"
    assert [i.sha256 for i in blobs.iter_blobs()] == [a.sha256]
    assert blobs.stale_temp_files() == []


def test_verify_on_read_catches_corruption(blobs):
    ref = blobs.put_bytes(b"x" * 5000)
    blobs.path(ref.sha256).write_bytes(b"y" * 5000)
    assert blobs.read_bytes(ref.sha256) == b"y" * 5000  # unverified read gives what is there
    with pytest.raises(BlobCorrupt):
        blobs.read_bytes(ref.sha256, verify=True)
    assert not blobs.check(ref.sha256)


def test_missing_blob(blobs):
    with pytest.raises(BlobNotFound):
        blobs.open("0" * 64)
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_failed_stream_leaves_nothing(blobs):
    def chunks():
        yield b"part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        blobs.put_stream(chunks())
    assert list(blobs.iter_blobs()) == [] and list((blobs.root / "tmp").iterdir()) == []


SLOW_WRITER = r"""
import sys, time
from store.blobs import FileBlobStore
store = FileBlobStore(sys.argv[1])
def chunks():
    for i in range(10_000):
        yield b"z" * 65536
        if i == 20:
            print("writing", flush=True)
        time.sleep(0.001)
store.put_stream(chunks())
"""


def _asset(patient_id, **hashes):
    n = hashes.pop("n")
    return Asset(patient_id=patient_id, study_uid=f"2.25.{n}", series_uid=f"2.25.{n}1", sop_instance_uid=f"2.25.{n}2",
                 size=1, media_type="image/jpeg", source="upload", **hashes)


def test_writer_killed_mid_write_leaves_no_partial_blob(gw):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(gw.blobs.root)], stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(gw.blobs.iter_blobs()) == []
    assert len(gw.blobs.stale_temp_files()) == 1
    assert not check_store(gw.db, gw.blobs).clean
    # restart: opening the gateway tidies what the dead writer left
    from gateway.core.context import Gateway

    Gateway.open(gw.settings).close()
    report = check_store(gw.db, gw.blobs)
    assert report.clean, report.summary()


def test_store_check_reports_missing_corrupt_and_orphans(gw):
    kept = gw.blobs.put_bytes(b"original")
    corrupt = gw.blobs.put_bytes(b"dicom")
    orphan = gw.blobs.put_bytes(b"nobody refers to me")
    with gw.db.write() as s:
        p = Patient(family_name="X")
        s.add(p)
        s.flush()
        s.add(_asset(p.id, n=1, sha256=kept.sha256, dicom_sha256=corrupt.sha256, preview_sha256="a" * 64))
        # an original dropped by setting is not "missing"
        s.add(_asset(p.id, n=2, sha256="b" * 64, original_kept=False))
    gw.blobs.path(corrupt.sha256).write_bytes(b"DICOM")
    report = check_store(gw.db, gw.blobs)
    assert report.missing == ["a" * 64]
    assert report.corrupt == [corrupt.sha256]
    assert report.orphans == [orphan.sha256]
    assert not report.clean

    # gc spares young orphans (their row may be about to commit), removes old ones
    assert collect_garbage(gw.db, gw.blobs, older_than=__import__("datetime").timedelta(hours=24), now=time.time()) == []
    removed = collect_garbage(gw.db, gw.blobs, older_than=__import__("datetime").timedelta(hours=24), now=time.time() + 2 * 86400)
    assert removed == [orphan.sha256]
    assert gw.blobs.exists(kept.sha256) and not gw.blobs.exists(orphan.sha256)


def test_store_cli_check_and_gc(gw, tmp_path):
    gw.blobs.put_bytes(b"orphan")
    env = dict(os.environ, CLINPHOTO_DATABASE_URL=gw.db.url, CLINPHOTO_DATA_DIR=str(tmp_path), CLINPHOTO_BLOB_DIR=str(gw.blobs.root))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True, cwd=REPO)

    check = run("store", "check")
    assert check.returncode == 1 and "orphan (stored, not referenced): 1" in check.stdout
    gc = run("store", "gc", "--older-than", "0s")
    assert gc.returncode == 0 and "removed 1" in gc.stdout
    again = run("store", "check")
    assert again.returncode == 0, again.stdout
    bad = run("store", "gc", "--older-than", "soon")
    assert bad.returncode != 0


def test_storing_existing_content_again_makes_it_young(blobs):
    ref = blobs.put_bytes(b"old orphan")
    old = time.time() - 72 * 3600
    os.utime(blobs.path(ref.sha256), (old, old))
    blobs.put_bytes(b"old orphan")  # a new upload of the same content; its row is about to commit
    assert blobs.mtime(ref.sha256) > time.time() - 60


def test_gc_spares_a_blob_stored_again_between_listing_and_delete(gw):
    """The race: gc lists an old orphan, a writer stores the same content, gc must not delete it."""
    import datetime

    ref = gw.blobs.put_bytes(b"content")
    old = time.time() - 72 * 3600
    os.utime(gw.blobs.path(ref.sha256), (old, old))
    real_iter = gw.blobs.iter_blobs

    def listing_then_writer_stores_again():
        yield from list(real_iter())
        gw.blobs.put_bytes(b"content")

    gw.blobs.iter_blobs = listing_then_writer_stores_again
    removed = collect_garbage(gw.db, gw.blobs, older_than=datetime.timedelta(hours=24), now=time.time())
    assert removed == [] and gw.blobs.exists(ref.sha256)


def test_stray_files_do_not_break_listing(blobs):
    ref = blobs.put_bytes(b"x")
    (blobs.root / ref.sha256[:2] / ".DS_Store").write_bytes(b"finder")
    (blobs.root / "README").write_text("not a blob")
    assert [i.sha256 for i in blobs.iter_blobs()] == [ref.sha256]


def test_a_new_fan_out_folder_is_synced_into_its_parent(tmp_path, monkeypatch):
    """A blob in a folder made for it is only durable once that folder's own entry is: each parent given a new entry
    is synced, and the blob's folder; a folder already there adds nothing."""
    from store import blobs as blobs_module

    synced: list[Path] = []
    real = blobs_module._fsync_dir
    monkeypatch.setattr(blobs_module, "_fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    store = FileBlobStore(tmp_path / "blobs")
    first = store.put_bytes(b"first")
    root = tmp_path / "blobs"
    folder = store.path(first.sha256).parent
    assert synced == [root, folder.parent, folder]
    synced.clear()
    spooled = tmp_path / "spooled"
    spooled.write_bytes(b"second")
    sha = hashlib.sha256(b"second").hexdigest()
    store.path(sha).parent.parent.mkdir(parents=True, exist_ok=True)  # its first level there already
    store.adopt(spooled, sha)
    assert synced == [store.path(sha).parent.parent, store.path(sha).parent]
    assert store.read_bytes(sha) == b"second"
