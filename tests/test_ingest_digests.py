"""The SHA-1 and write-back of a spooled object, begun on helper threads (gateway/core/ingest/digests.py)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from sqlalchemy import select

from gateway.core.ingest import deferred, errors
from gateway.core.ingest.digests import Early, sha1_base64
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.pipeline import ingest
from gateway.core.ingest.request import CaptureRequest, ReceivedObject, Source
from store.models import Asset
from tests import dicom_objects as objects
from tests.ingest_helpers import add_patient


def test_early_digests_are_the_files_and_a_missing_file_raises_as_reading_it_would(tmp_path):
    path = tmp_path / "object.dcm"
    data = bytes(range(256)) * 20_000  # several of sha1_base64's 1 MiB chunks
    path.write_bytes(data)
    expected = base64.b64encode(hashlib.sha1(data).digest()).decode()
    early = Early(path)
    assert early.sha1() == expected == sha1_base64(path) == sha1_base64(data)
    assert early.sha256() == hashlib.sha256(data).hexdigest()
    assert Early(path, sha256="given").sha256() == "given"  # a door's own is taken as it is
    assert Early(path, want_sha1=False).sha1() is None  # left to the renderer (deferred.py)
    gone = Early(tmp_path / "gone.dcm")
    with pytest.raises(FileNotFoundError):
        gone.sha1()
    with pytest.raises(FileNotFoundError):
        gone.sha256()


def test_a_spooled_object_keeps_the_digests_of_its_stored_bytes(gw, fx):
    """Through the pipeline as the C-STORE door hands it a spooled object (no digest given): the blob is named by
    the file's SHA-256, and the door may delete its spooled name once answered. The row's SHA-1 (FHIR
    Attachment.hash) is the blob's, worked out with the renditions after the answer."""
    add_patient(gw)
    fd, spooled = gw.spool.new_file(prefix="cstore-", suffix=".dcm")
    os.close(fd)
    objects.img2dcm(fx["baseline_420.jpg"], spooled, PatientID=objects.NHS_NUMBER, IssuerOfPatientID="NHS")
    sha256 = hashlib.sha256(spooled.read_bytes()).hexdigest()
    ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"), items=[ReceivedObject(spooled, spooled=True)]))
    spooled.unlink()
    with gw.db.read() as s:
        stored, sha1, asset_id = s.execute(select(Asset.dicom_sha256, Asset.sha1, Asset.id)).one()
    assert stored == sha256 and sha1 is None
    deferred.make(gw, asset_id)
    with gw.db.read() as s:
        assert s.execute(select(Asset.sha1)).scalar_one() == sha1_base64(gw.blobs.path(sha256))


def _spooled(gw, fx, name: str = "baseline_420.jpg", **keys: str):
    """A received object in the spool as the doors leave it, with the SHA-256 they worked out as it came."""
    fd, spooled = gw.spool.new_file(prefix="cstore-", suffix=".dcm")
    os.close(fd)
    keys = {"PatientID": objects.NHS_NUMBER, "IssuerOfPatientID": "NHS", **keys}
    objects.img2dcm(fx[name], spooled, **keys)
    return ReceivedObject(spooled, spooled=True, sha256=hashlib.sha256(spooled.read_bytes()).hexdigest())


def test_a_hashed_spooled_object_is_linked_in_while_its_header_is_read_and_kept_once(gw, fx):
    """adopt_soon: the blob is the spooled file itself (a hard link, synced), there once the ingest answers; the door
    may delete its name. The same object twice in one request is one blob and one photo."""
    add_patient(gw)
    item = _spooled(gw, fx)
    twin = gw.spool.path / "cstore-twin.dcm"
    twin.write_bytes(item.path.read_bytes())
    result = ingest(gw, CaptureRequest(source=Source.dicom_peer("CAMERA", "127.0.0.1"),
                                       items=[item, ReceivedObject(twin, spooled=True, sha256=item.sha256)]))
    assert os.stat(gw.blobs.path(item.sha256)).st_ino == os.stat(item.path).st_ino
    item.path.unlink()
    twin.unlink()
    assert [b.sha256 for b in gw.blobs.iter_blobs()] == [item.sha256] and gw.blobs.check(item.sha256)
    assert len({p.asset_id for p in result.photos}) == 1
    with gw.db.read() as s:
        assert s.execute(select(Asset.dicom_sha256)).scalars().all() == [item.sha256]


@pytest.mark.parametrize(("stage", "expected"), [
    ("unknown patient", errors.UNKNOWN_PATIENT), ("second item's header", errors.INVALID_OBJECT),
    ("duplicate instance", errors.DUPLICATE_INSTANCE), ("corrupt frame", errors.CORRUPT)])
def test_a_refused_object_linked_in_early_leaves_no_blob(gw, fx, stage, expected):
    """Refused at any stage after adopt_soon began (the patient look-up, another item's header, the known instances,
    the frame check): the blobs it linked in are removed again, and nothing names them."""
    if stage != "unknown patient":
        add_patient(gw)
    source = Source.dicom_peer("CAMERA", "127.0.0.1")
    before: set[str] = set()
    if stage == "duplicate instance":
        first = _spooled(gw, fx, SOPInstanceUID="2.25.1234567")
        ingest(gw, CaptureRequest(source=source, items=[first]))
        before = {b.sha256 for b in gw.blobs.iter_blobs()}
        items = [_spooled(gw, fx, "baseline_444.jpg", SOPInstanceUID="2.25.1234567")]
    elif stage == "second item's header":
        bad = gw.spool.path / "cstore-bad.dcm"
        bad.write_bytes(b"\0" * 128 + b"DICM" + b"not a file meta")
        items = [_spooled(gw, fx), ReceivedObject(bad, spooled=True, sha256=hashlib.sha256(bad.read_bytes()).hexdigest())]
    elif stage == "corrupt frame":  # cut short: seen without decoding, after the header was read
        cut = gw.spool.path / "cstore-cut.dcm"
        jpeg = fx["baseline_420.jpg"].read_bytes()
        objects.jpeg_wrapped(cut, jpeg[: len(jpeg) // 2] + b"\x00" * (len(jpeg) // 2 % 2), 640, 480)
        items = [ReceivedObject(cut, spooled=True, sha256=hashlib.sha256(cut.read_bytes()).hexdigest())]
    else:
        items = [_spooled(gw, fx)]
    with pytest.raises(IngestRejected) as refused:
        ingest(gw, CaptureRequest(source=source, items=items))
    assert refused.value.code == expected
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == before
    with gw.db.read() as s:
        assert len(s.execute(select(Asset.id)).all()) == len(before)
    for item in items:  # the door's own names are untouched: it deletes them itself
        assert item.path.exists()
