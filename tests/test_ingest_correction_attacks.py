"""Attacks on the correction of a received photo whose pixels did not decode (pipeline._correction, _replace,
BlobWriter.remove_superseded), on both backends.

A resend under the SOP Instance UID of an asset whose rendition_state is FAILED replaces that asset's stored object
in place. These tests try to make the replacement lose or mix data: a renderer still decoding the superseded object,
a resend that describes another photo than the row keeps, a reader holding the old blob, a crash before the
superseded blob is deleted, a quarantined photo, a resend that itself does not decode, routing.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from gateway.core.context import Gateway
from gateway.core.ingest import deferred, errors, received
from gateway.core.ingest.blob_writer import BlobWriter
from gateway.core.ingest.errors import IngestRejected
from gateway.core.ingest.renditions import DUE, FAILED
from store import audit
from store.integrity import check_store, collect_garbage
from store.models import Asset, OutboxItem
from tests.ingest_helpers import add_patient
from tests.test_ingest_deferred_attacks import (
    chain_ok,
    clean_store,
    damaged_inside,
    events,
    failed_photo,
    load,
    receive,
    referenced,
    resend_of,
)
from tests.test_photos_api import api  # noqa: F401 (the live-server fixture)


def _set_failed(gw: Gateway, asset_id: str) -> None:
    """What another process's maker does when its decode of the same object fails first."""
    with gw.db.write() as s:
        s.get_one(Asset, asset_id).rendition_state = FAILED


def _damaged_photo_and_its_resend(gw: Gateway, fx, tmp_path: Path) -> tuple[str, Path]:
    """A received photo damaged inside (answered, its pixels not yet decoded) and the sender's intact resend of it."""
    add_patient(gw)
    damaged = damaged_inside(tmp_path, fx)
    return receive(gw, damaged).photos[0].asset_id, resend_of(damaged, tmp_path, fx)


def _correct_meanwhile(gw: Gateway, asset_id: str, intact: Path, done: list[str]) -> None:
    """While a stale maker decodes the damaged object: another process's maker fails it first, and the sender's
    resend corrects it (the photo is due again, with its new object)."""
    _set_failed(gw, asset_id)
    done.append(receive(gw, intact).photos[0].status)
    assert load(gw, asset_id).rendition_state == DUE


def test_a_stale_decode_of_the_superseded_object_does_not_fail_the_correction(gw, fx, tmp_path, monkeypatch):
    """Two makers decode the same due photo (two gateway processes); one finds the pixels damaged, the sender
    resends at once and the correction makes the photo due with its new object; then the other maker's decode of
    the *superseded* object fails. Its verdict is about an object the asset no longer names: it must not mark the
    corrected photo failed (nor audit a new 'did not decode'), and the new object's renditions are made."""
    asset_id, intact = _damaged_photo_and_its_resend(gw, fx, tmp_path)
    decode = received.renditions
    done: list[str] = []

    def stale(obj, *args, **kwargs):
        try:
            return decode(obj, *args, **kwargs)
        finally:
            if not done:
                _correct_meanwhile(gw, asset_id, intact, done)

    monkeypatch.setattr(received, "renditions", stale)
    deferred.make(gw, asset_id)  # the stale maker: its decode of the damaged object fails
    monkeypatch.undo()
    assert done == ["replaced"]
    after = load(gw, asset_id)
    assert after.rendition_state == DUE, "the corrected photo was marked failed by a decode of the superseded object"
    assert not events(gw, outcome=audit.SERIOUS_FAILURE)
    made = deferred.make(gw, asset_id)
    assert made.state is None and made.preview_sha256
    clean_store(gw)
    chain_ok(gw)


def test_a_stale_decode_that_succeeds_does_not_give_the_corrected_photo_the_old_objects_renditions(
        gw, fx, tmp_path, monkeypatch):
    """The same race with the other outcome (the stale maker's decode succeeds, as one may after another process
    gave the photo up): its preview belongs to the superseded object and must not be written to the corrected row."""
    add_patient(gw)
    damaged = damaged_inside(tmp_path, fx)
    asset_id = receive(gw, damaged).photos[0].asset_id
    intact = resend_of(damaged, tmp_path, fx)
    other = resend_of(damaged, tmp_path, fx, "other-pixels.dcm")  # stands for the old object's decoded pixels
    decode = received.renditions
    done: list[str] = []

    def stale(obj, *args, **kwargs):
        rends = decode(received.read(other, gw.settings.ingest), *args, **kwargs)
        if not done:
            _correct_meanwhile(gw, asset_id, intact, done)
        return rends.__class__(**{**rends.__dict__, "preview": rends.preview + b"\0stale"})

    monkeypatch.setattr(received, "renditions", stale)
    deferred.make(gw, asset_id)
    monkeypatch.undo()
    assert done == ["replaced"]
    after = load(gw, asset_id)
    assert after.rendition_state == DUE and after.preview_sha256 is None
    made = deferred.make(gw, asset_id)
    assert made.state is None and not gw.blobs.path(made.preview_sha256).read_bytes().endswith(b"\0stale")
    clean_store(gw)


def test_a_stale_maker_whose_object_was_superseded_and_deleted_does_not_hold_up_the_correction(
        gw, fx, tmp_path, monkeypatch, caplog):
    """The stale maker opens the superseded object after the correction deleted it: that is not the host's fault
    (no 'missing from the blob store, run store check' error) and the corrected photo is not paused for a minute."""
    asset_id, intact = _damaged_photo_and_its_resend(gw, fx, tmp_path)
    decode = received.renditions
    done: list[str] = []

    def stale(obj, *args, **kwargs):
        if not done:
            _correct_meanwhile(gw, asset_id, intact, done)
        return decode(obj, *args, **kwargs)

    monkeypatch.setattr(received, "renditions", stale)
    deferred.make(gw, asset_id)
    monkeypatch.undo()
    assert done == ["replaced"]
    after = load(gw, asset_id)
    assert (after.rendition_state, after.rendition_after, after.rendition_tries) == (DUE, None, 0)
    assert deferred.due(gw, ready=True) == [asset_id]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_a_resend_describing_another_photo_does_not_correct_a_failed_one(gw, fx, tmp_path):
    """The row keeps the first object's descriptive columns (taken at, body site, laterality, instance number,
    device, operator), worked out from its header; a resend whose header says another side or another time
    describes another photo. Accepted, the stored DICOM object (which keeps its own Laterality) would say 'left'
    while the row, FHIR Media and the REST API say 'right': a wrong-side photo. It stays a duplicate-instance."""
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    blobs = {b.sha256 for b in gw.blobs.iter_blobs()}
    for name, keys in (("left.dcm", {"Laterality": "L"}),
                       ("later.dcm", {"ContentDate": "20240306"}),
                       ("number.dcm", {"InstanceNumber": "9"})):
        with pytest.raises(IngestRejected) as refused:
            receive(gw, resend_of(damaged, tmp_path, fx, name, **keys))
        assert refused.value.code == errors.DUPLICATE_INSTANCE, name
    after = load(gw, before.id)
    assert (after.sha256, after.rendition_state, after.laterality) == (before.sha256, FAILED, before.laterality)
    assert {b.sha256 for b in gw.blobs.iter_blobs()} == blobs
    # the intact object that says the same as the first still corrects it
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
    clean_store(gw)


def test_a_reader_holding_the_superseded_blob_reads_it_to_the_end(gw, fx, tmp_path):
    """A retrieve that opened the old object before the correction committed (WADO-RS, C-GET, FHIR Binary stream
    from an open file) gets all of its bytes, not a truncated file; later readers get the new object."""
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    old = damaged.read_bytes()
    with gw.blobs.path(before.dicom_sha256).open("rb") as reading:
        head = reading.read(100)
        assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
        assert not gw.blobs.exists(before.dicom_sha256)
        assert head + reading.read() == old
    assert gw.blobs.path(load(gw, before.id).dicom_sha256).read_bytes() != old


def test_a_crash_before_the_superseded_blob_is_deleted_leaves_an_orphan_for_store_gc(gw, fx, tmp_path, monkeypatch):
    """kill -9 between the commit and the delete: the row names the new object (whole), the superseded blob is an
    orphan that `store check` reports and `store gc` removes; nothing a row names is touched."""
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    monkeypatch.setattr(BlobWriter, "remove_superseded", lambda self: self.superseded.clear())
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
    after = load(gw, before.id)
    report = check_store(gw.db, gw.blobs, verify_hashes=True)
    assert report.orphans == [before.sha256] and not report.missing and not report.corrupt
    removed = collect_garbage(gw.db, gw.blobs, older_than=timedelta(0), now=time.time() + 1)
    assert removed == [before.sha256]
    assert gw.blobs.exists(after.dicom_sha256)
    clean_store(gw)


def test_a_failure_to_delete_the_superseded_blob_does_not_change_the_answer(gw, fx, tmp_path, monkeypatch):
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)

    def broken(sha):
        raise OSError("read-only file system")

    monkeypatch.setattr(gw.blobs, "delete", broken)
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
    monkeypatch.undo()
    assert gw.blobs.exists(before.sha256) and not referenced(gw, before.sha256)


def test_a_resend_that_itself_does_not_decode_is_failed_again_and_can_be_corrected_again(gw, fx, tmp_path):
    """No loop and no dead end: a resend damaged in transfer again replaces, fails, is audited; the next intact
    resend corrects it; the trail has one update per replacement."""
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    again = resend_of(damaged, tmp_path, fx, "again-damaged.dcm")
    ds = pydicom.dcmread(again)
    jpeg = fx["baseline_420.jpg"].read_bytes()
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([jpeg[: len(jpeg) // 3] + b"\xff\xd9"])
    ds.save_as(again, enforce_file_format=True)
    assert receive(gw, again).photos[0].status == "replaced"
    assert deferred.make(gw, before.id).state == FAILED
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
    assert deferred.make(gw, before.id).state is None
    updates = [e for e in events(gw, type_code=audit.IMPORT, action="U") if e.outcome == audit.SUCCESS]
    assert len(updates) == 2 and updates[0].detail["sha256"] == updates[1].detail["replaced_sha256"]
    assert len(events(gw, outcome=audit.SERIOUS_FAILURE)) == 2
    clean_store(gw)
    chain_ok(gw)


def test_a_quarantined_photo_whose_pixels_did_not_decode_is_corrected_by_its_resend(gw, fx, tmp_path):
    """A photo of a patient the PAS has not registered yet is kept in quarantine under a placeholder; if its pixels
    did not decode, the sender's intact resend (same unknown patient) must correct it as for a known patient, or
    the known-bad copy blocks its own correction for good (the defect the correction was made for)."""
    gw.settings.ingest.quarantine_unknown_patients = True
    damaged = damaged_inside(tmp_path, fx)
    first = receive(gw, damaged).photos[0]
    assert first.quarantined
    assert deferred.make(gw, first.asset_id).state == FAILED
    again = receive(gw, resend_of(damaged, tmp_path, fx)).photos[0]
    assert (again.status, again.asset_id, again.quarantined) == ("replaced", first.asset_id, True)
    assert load(gw, first.asset_id).status == "quarantined"
    clean_store(gw)


def test_a_correction_reaches_a_destination_the_damaged_copy_was_routed_to(gw, fx, tmp_path):
    """A PACS that was sent the damaged copy (delivered, committed, or given up on after its tries) is sent the
    corrected object: its outbox item is pending again, due now, its tries counted afresh, and says why. An item an
    operator cancelled stays cancelled."""
    from gateway.core.routing import CORRECTED, Route

    add_patient(gw)
    destinations = {"PACS1": "delivered", "PACS2": "committed", "PACS3": "dead", "PACS4": "cancelled"}
    gw.settings.routing.routes = [Route(destination=d) for d in destinations]
    damaged = damaged_inside(tmp_path, fx)
    asset_id = receive(gw, damaged).photos[0].asset_id
    with gw.db.write() as s:
        for item in s.scalars(select(OutboxItem).where(OutboxItem.asset_id == asset_id)):
            item.status, item.attempts = destinations[item.destination], 3
    assert deferred.make(gw, asset_id).state == FAILED
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"
    with gw.db.read() as s:
        items = {i.destination: (i.status, i.attempts, i.last_error, i.delivered_at, i.commitment_uid)
                 for i in s.scalars(select(OutboxItem).where(OutboxItem.asset_id == asset_id))}
    again = ("pending", 0, CORRECTED, None, None)
    assert items == {"PACS1": again, "PACS2": again, "PACS3": again, "PACS4": ("cancelled", 3, None, None, None)}


def test_a_download_resumed_across_a_correction_is_not_spliced_from_two_objects(gw, fx, tmp_path, api):  # noqa: F811
    """FHIR Binary answers Range requests and If-Range against its ETag. Before corrections an original never changed
    under its id, so `"<id>-original"` named one representation; a correction changes the bytes under the same id,
    so a client resuming a download of the superseded object (If-Range with the old ETag) must get the whole new
    object (200), not the new object's tail to append to the old one's head."""
    from tests.auth_helpers import auth_headers

    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    mi = {**auth_headers(gw, role="medical-illustration", sub="mi.jones"), "Accept": "application/dicom"}
    head = api.get(f"/fhir/Binary/{before.id}", headers={**mi, "Range": "bytes=0-99"})
    assert head.status_code == 206 and head.content == damaged.read_bytes()[:100]
    intact = resend_of(damaged, tmp_path, fx)
    assert receive(gw, intact).photos[0].status == "replaced"
    rest = api.get(f"/fhir/Binary/{before.id}", headers={**mi, "Range": "bytes=100-", "If-Range": head.headers["etag"]})
    assert rest.headers["etag"] != head.headers["etag"]
    assert rest.status_code == 200 and rest.content == intact.read_bytes()


def test_a_resend_after_the_patient_was_merged_corrects_the_photo_under_the_survivor(gw, fx, tmp_path):
    """An A40 moved the failed photo to the surviving record; the modality still sends the merged record's number.
    Whatever the answer, the photo never moves, and is never left half-corrected."""
    from store.models import Patient

    first = add_patient(gw)
    survivor = add_patient(gw, nhs="9434765919", mrn="M200", visit="V200")
    damaged, before = failed_photo(gw, tmp_path, fx)
    with gw.db.write() as s:
        s.get_one(Patient, first["id"]).merged_into_id = survivor["id"]
        s.get_one(Asset, before.id).patient_id = survivor["id"]
    again = receive(gw, resend_of(damaged, tmp_path, fx)).photos[0]
    after = load(gw, before.id)
    assert (again.status, again.asset_id) == ("replaced", before.id)
    assert (after.patient_id, after.filed_patient_id, after.rendition_state) == (survivor["id"], before.filed_patient_id, DUE)
    [update] = [e for e in events(gw, type_code=audit.IMPORT, action="U") if e.outcome == audit.SUCCESS]
    assert update.patient_id == survivor["id"]
    clean_store(gw)


def test_a_photo_taken_out_of_the_record_is_not_corrected(gw, fx, tmp_path):
    """A failed photo marked entered-in-error (filed in error, e.g. under the wrong patient) is out of the record:
    a resend under its UID must not be answered 'replaced' (stored, as far as the sender knows) nor change it."""
    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    with gw.db.write() as s:
        s.get_one(Asset, before.id).status = "entered-in-error"
    with pytest.raises(IngestRejected) as refused:
        receive(gw, resend_of(damaged, tmp_path, fx))
    assert refused.value.code == errors.DUPLICATE_INSTANCE
    after = load(gw, before.id)
    assert (after.sha256, after.rendition_state) == (before.sha256, FAILED)
    clean_store(gw)


def test_a_correction_in_a_request_with_new_photos_and_itself_twice(gw, fx, tmp_path):
    """One STOW-RS-like request: the correction, the same correction again, and a new photo. Each is answered for
    itself (replaced, existing, created), the new photo is a new asset, and the trail has one update and one
    creation."""
    from gateway.core.ingest.pipeline import ingest
    from gateway.core.ingest.request import CaptureRequest, ReceivedObject
    from tests.test_ingest_deferred_attacks import PEER, good_object

    add_patient(gw)
    damaged, before = failed_photo(gw, tmp_path, fx)
    intact = resend_of(damaged, tmp_path, fx)
    other = good_object(tmp_path, fx, "new.dcm")
    result = ingest(gw, CaptureRequest(source=PEER, items=[ReceivedObject(p, filename=p.name) for p in (intact, intact, other)]))
    assert [p.status for p in result.photos] == ["replaced", "existing", "created"]
    assert result.photos[0].asset_id == result.photos[1].asset_id == before.id != result.photos[2].asset_id
    stored = [e for e in events(gw, type_code=audit.IMPORT) if e.outcome == audit.SUCCESS]
    assert [e.entities[0]["id"] for e in stored if e.action == "U"] == [before.id]
    assert result.photos[2].asset_id in [e.entities[0]["id"] for e in stored if e.action == "C"]
    clean_store(gw)


def test_a_correction_committed_while_its_superseded_object_is_being_sent_is_sent_again(gw, fx, tmp_path):
    """The router has claimed the photo's item and is sending the damaged object when the correction commits: its
    'delivered' must not close the item (the destination got the superseded object), which stays pending, due at
    once, for the corrected object to go next."""
    from gateway.core import routing
    from gateway.core.routing import CORRECTED, Route

    add_patient(gw)
    gw.settings.routing.routes = [Route(destination="PACS1")]
    damaged = damaged_inside(tmp_path, fx)
    asset_id = receive(gw, damaged).photos[0].asset_id
    assert deferred.make(gw, asset_id).state == FAILED
    [claimed] = routing.claim(gw, gw.settings.routing)
    superseded = load(gw, asset_id).dicom_sha256
    assert receive(gw, resend_of(damaged, tmp_path, fx)).photos[0].status == "replaced"  # while the send is under way
    routing.delivered(gw, gw.settings.routing, {claimed.id: superseded})
    with gw.db.read() as s:
        item = s.get_one(OutboxItem, claimed.id)
        assert (item.status, item.last_error, item.delivered_at) == ("pending", CORRECTED, None)
    [again] = routing.claim(gw, gw.settings.routing)  # due at once, not after the first sender's lease
    corrected = load(gw, asset_id).dicom_sha256
    assert again.id == claimed.id and corrected != superseded
    routing.delivered(gw, gw.settings.routing, {again.id: corrected})
    with gw.db.read() as s:
        assert s.get_one(OutboxItem, claimed.id).status == "delivered"
