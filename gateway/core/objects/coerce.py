"""A stored DICOM object as it is served: the patient module of today, the pixel data untouched.

Archives coerce attributes on the way out (PS3.4 "coercion of attributes"): what
the stored file says about the patient was true when it was received or built; the
patient index may have changed since (an A40 merge, an A08 demographics update, a
quarantined object reconciled). So every object, received or built by clinphoto, is
served with the Patient Module the index holds at that moment:

- PatientName, PatientID, IssuerOfPatientID, PatientBirthDate, PatientSex and
  OtherPatientIDsSequence replaced (vlphoto.patient_module); the sender's
  IssuerOfPatientIDQualifiersSequence and retired OtherPatientIDs, which would
  contradict them, removed;
- a missing Laterality (General Series, Type 2C) supplied from the photo's recorded
  laterality (empty when it has none), so a sender that left it out does not make
  the served object invalid; every other attribute is kept as stored;
- the file meta names clinphoto as the implementation that wrote the file; the
  transfer syntax is the stored one;
- Pixel Data, and anything after it, copied byte for byte from the stored file, in
  chunks: only the header is ever parsed (gateway/core/objects/part10.py).

A non-ASCII value (a name with accents) in an object whose character set cannot hold
it switches the object to UTF-8 (ISO_IR 192), every text value re-encoded. A digital
signature the sender put in the object no longer verifies, as with any coercion.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.uid import UID

from gateway.core.objects import part10
from gateway.core.objects.uids import IMPLEMENTATION_VERSION_NAME, implementation_class_uid
from gateway.core.objects.vlphoto import PatientInfo, patient_module, patient_values_ascii

UTF8 = "ISO_IR 192"
_LATERALITY = {"right": "R", "left": "L"}
# file meta elements that describe an earlier transfer (source/sending/receiving AE, private
# information): the served file is written by clinphoto, so they no longer apply
_TRANSFER_META = range(0x00020016, 0x00020103)
_STALE_PATIENT = (0x00100024, 0x00101000)  # IssuerOfPatientIDQualifiersSequence, OtherPatientIDs (retired)


@dataclass(frozen=True)
class Served:
    """A Part 10 object to send: a new header, then the stored file's bytes from `offset` on."""

    header: bytes
    source: Path
    offset: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str

    @property
    def size(self) -> int:
        return len(self.header) + self.source.stat().st_size - self.offset

    def chunks(self, size: int = part10.CHUNK) -> Iterator[bytes]:
        """The whole object: the header, then Pixel Data (and what follows it) as stored."""
        yield self.header
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            while chunk := f.read(size):
                yield chunk

    def read(self) -> bytes:
        """The whole object in memory (small objects, tests); prefer chunks()."""
        return b"".join(self.chunks())


def coerce(path: Path, patient: PatientInfo, *, laterality: str | None = None, uid_root: str = "2.25") -> Served:
    """The stored object at `path` as served to `patient`'s current Patient Module (raises part10.Part10Error)."""
    head = part10.read_head(path)
    ds = head.dataset
    if not patient_values_ascii(patient) and str(ds.get("SpecificCharacterSet", "") or "") != UTF8:
        ds.decode()  # every text value to str under the old character set, so all re-encode as UTF-8
        ds.SpecificCharacterSet = UTF8
    patient_module(ds, patient)
    for tag in _STALE_PATIENT:
        if tag in ds:
            del ds[tag]
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        ds.Laterality = _LATERALITY.get(laterality or "", "")
    meta = ds.file_meta
    # int(): a BaseTag (an int subclass) makes `in range` walk the range, a fifth of coerce()'s time (cProfile)
    for tag in [t for t in meta.keys() if int(t) in _TRANSFER_META]:
        del meta[tag]
    meta.ImplementationClassUID = UID(implementation_class_uid(uid_root))
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return Served(
        header=out.getvalue(), source=path, offset=head.pixel_offset if head.pixel_offset is not None else head.size,
        transfer_syntax=head.transfer_syntax, sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
    )
