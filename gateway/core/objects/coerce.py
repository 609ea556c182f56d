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
  chunks: only the header is ever parsed (gateway/core/objects/part10.py); but for a
  JPEG frame's metadata (EXIF with GPS, XMP, comments, a phone's appended previews),
  which is left out (served_pixels.py).

A non-ASCII value (a name with accents) in an object whose character set cannot hold
it switches the object to UTF-8 (ISO_IR 192), every text value re-encoded. A digital
signature the sender put in the object no longer verifies, as with any coercion.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.uid import UID

from gateway.core.objects import jpeg, part10
from gateway.core.objects.jpeg import Piece
from gateway.core.objects.served_pixels import served_tail
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
    """A Part 10 object to send: a new header, then `tail`: the stored file's bytes from `offset` on, as ranges of
    it and bytes made here (one range, (offset, source_size), unless a JPEG frame's metadata is left out)."""

    header: bytes
    source: Path
    offset: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    source_size: int  # the stored file's length when the header was made (it ends the bytes sent from it)
    tail: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return len(self.header) + self.tail_size

    @property
    def tail_size(self) -> int:
        return sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in self.tail)

    @property
    def as_stored(self) -> bool:
        """The stored file's bytes follow the header unchanged."""
        return self.tail == ((self.offset, self.source_size),)

    def chunks(self, size: int = part10.CHUNK) -> Iterator[bytes]:
        """The whole object: the header, then Pixel Data (and what follows it) as served."""
        yield self.header
        with open(self.source, "rb") as f:
            for piece in self.tail:
                if isinstance(piece, bytes):
                    yield piece
                    continue
                f.seek(piece[0])
                left = piece[1] - piece[0]
                while left > 0 and (chunk := f.read(min(size, left))):
                    left -= len(chunk)
                    yield chunk

    def read_tail(self) -> bytes:
        """The bytes after the header, in memory (raises part10.Part10Error if the file has shrunk)."""
        with open(self.source, "rb") as f:
            pieces = [p if isinstance(p, bytes) else part10.read_range(f, *p) for p in self.tail]
        tail = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(tail) != self.tail_size:
            raise part10.Part10Error("the stored file is shorter than when its header was made")
        return tail

    def read(self) -> bytes:
        """The whole object in memory (small objects, tests); prefer chunks()."""
        return b"".join(self.chunks())


def coerce(path: Path, patient: PatientInfo, *, laterality: str | None = None, uid_root: str = "2.25") -> Served:
    """The stored object at `path` as served to `patient`'s current Patient Module (raises part10.Part10Error).

    The served header is a function of the stored file and these arguments alone, so it is made once and kept
    (HEADERS) until the file, the patient module or the laterality differs: parsing and writing the header of the
    bench's 12-MP photo cost 2.4-2.9 ms of CPU (a loaded 2-core machine), a third of a WADO-RS retrieve's server
    CPU, for the same bytes every time; found in HEADERS, 6 us."""
    try:
        st = path.stat()
    except OSError as exc:
        raise part10.Part10Error(f"cannot read the stored file ({exc.strerror})") from None
    key = (str(path), st.st_size, st.st_mtime_ns, _patient_key(patient), laterality, uid_root)
    served = HEADERS.get(key)
    if served is None:
        served = HEADERS.put(key, _coerce(path, patient, laterality, uid_root))
    return served


def _patient_key(p: PatientInfo) -> tuple[object, ...]:
    return (p.patient_id, p.issuer, p.family, p.given, p.prefix, p.birth_date, p.sex, tuple(p.other_ids))


class HeaderCache:
    """Served objects by what they are made from, least recently used dropped past `limit` header bytes; shared by
    the threads of the process (a header is a few kB: the default holds thousands)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Served] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> Served | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: Hashable, served: Served) -> Served:
        size = _cached_bytes(served)
        if size > self.limit // 16:
            return served  # a header this big (a large ICC profile, say) would push out many others
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += size - (_cached_bytes(old) if old is not None else 0)
            self._entries[key] = served
            while self._bytes > self.limit:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= _cached_bytes(dropped)
        return served

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _cached_bytes(served: Served) -> int:
    return len(served.header) + sum(len(p) for p in served.tail if isinstance(p, bytes))


HEADERS = HeaderCache(16 << 20)


def _coerce(path: Path, patient: PatientInfo, laterality: str | None, uid_root: str) -> Served:
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
    offset = head.pixel_offset if head.pixel_offset is not None else head.size
    try:
        tail = served_tail(path, head) if head.pixel_offset is not None else ((offset, head.size),)
    except jpeg.JpegError as exc:
        raise part10.Part10Error(f"its JPEG frame cannot be read ({exc})") from None
    return Served(
        header=out.getvalue(), source=path, offset=offset, transfer_syntax=head.transfer_syntax,
        sop_class_uid=str(ds.get("SOPClassUID", "")), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        source_size=head.size, tail=tail,
    )
