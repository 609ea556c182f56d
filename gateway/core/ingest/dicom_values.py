"""A sender's DICOM values checked before anything of theirs is stored: one check for every way in.

- UIDs (Study, Series, SOP Instance): a received Part 10 object's (received.read) and those a DICOM JSON data set
  gives an image (STOW-RS, CaptureRequest.study_uid / series_uid, ImageFile.sop_instance_uid) alike. A UID names a
  stored object in URLs, queries and every peer's database: `../../x` or 6,000 characters must never become one.
- a DICOM JSON data set whose values become the photo's record (check_values): its UIDs as above, its other values
  within their VR's length (PS3.5 Table 6.2-1): a 100 kB StudyDescription is refused naming it, not stored cut.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from gateway.core.ingest.errors import BAD_METADATA, INVALID_OBJECT, IngestRejected
from gateway.core.objects.uids import is_valid_uid

# characters (of the default and UTF-8 repertoires alike, as the standard counts them); PN per component group;
# UC, UR, UT and the binary VRs have no limit of their own (the request's size bounds them)
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240, "PN": 64,
              "SH": 16, "ST": 1024, "TM": 14, "UI": 64}


def sender_uid(uid: str, keyword: str) -> str:
    """`uid` if it is a valid UID (PS3.5 9.1: digits and dots, no leading zero, at most 64), else IngestRejected
    INVALID_OBJECT naming the attribute."""
    if not is_valid_uid(uid):
        raise IngestRejected(INVALID_OBJECT, f"{keyword} is missing or not a valid UID ({uid[:70]!r})", field=keyword)
    return uid


def check_values(ds: Dataset) -> None:
    """Every UID of the data set (in sequences too) valid as sender_uid() has it, and every other string value within
    its VR's maximum length, else IngestRejected (INVALID_OBJECT, BAD_METADATA) naming the attribute, its message
    short enough for a DICOM ErrorComment."""
    for element in _elements(ds):
        limit = MAX_LENGTH.get(str(element.VR))
        if limit is None or element.value is None:
            continue
        name = element.keyword or str(element.tag)
        for value in element.value if element.VM > 1 else [element.value]:
            if element.VR == "UI":
                if value:  # an empty value is no value: a required one is missed as such
                    sender_uid(str(value), name)
                continue
            pieces = str(value).split("=") if element.VR == "PN" else [str(value)]
            longest = max(len(piece) for piece in pieces)
            if longest > limit:
                raise IngestRejected(BAD_METADATA, f"{name}: {longest} characters, over {element.VR}'s {limit}"[:64], field=name)


def _elements(ds: Dataset) -> Iterator[DataElement]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _elements(item)
        else:
            yield element
