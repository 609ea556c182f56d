"""The SHA-1 and write-back of a spooled object, begun on helper threads (gateway/core/ingest/digests.py)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from sqlalchemy import select

from gateway.core.ingest import deferred
from gateway.core.ingest.digests import Early, sha1_base64
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
