"""EXIF facts we use, and the privacy rule for everything derived.

Derived objects (the DICOM file, preview, thumbnail) carry no EXIF block at all:
we copy over an allow-list of facts (orientation is applied, then dropped; make,
model and software become DICOM equipment attributes; DateTimeOriginal becomes
the content date/time). Everything else — GPS and other location tags, owner and
artist names, body/lens serial numbers, image unique ids, maker notes — stays only
in the sealed original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from PIL import Image

IFD_EXIF = 0x8769
IFD_GPS = 0x8825

ORIENTATION = 0x0112
MAKE = 0x010F
MODEL = 0x0110
SOFTWARE = 0x0131
DATETIME_ORIGINAL = 0x9003
OFFSET_TIME_ORIGINAL = 0x9011
SUBSEC_TIME_ORIGINAL = 0x9291
LENS_MODEL = 0xA434

# Never copied into anything derived or served (listed so tests and reviewers can see the rule).
PRIVATE_TAGS = {
    0x8825: "GPSInfo",
    0x927C: "MakerNote",
    0xA430: "CameraOwnerName",
    0xA431: "BodySerialNumber",
    0xA435: "LensSerialNumber",
    0xA420: "ImageUniqueID",
    0x013B: "Artist",
    0x8298: "Copyright",
    0x9286: "UserComment",
    0x010E: "ImageDescription",
    0xC62F: "CameraSerialNumber",
}

# EXIF orientation -> Pillow transpose that makes the image upright
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ExifFacts:
    orientation: int = 1
    make: str | None = None
    model: str | None = None
    software: str | None = None
    lens_model: str | None = None
    taken_at: datetime | None = None  # aware when the camera recorded its UTC offset
    has_gps: bool = False

    @property
    def swaps_axes(self) -> bool:
        return self.orientation in (5, 6, 7, 8)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).replace("\x00", "").strip()
    return text[:64] or None


def _taken_at(exif_ifd: Mapping[int, object]) -> datetime | None:
    raw = _text(exif_ifd.get(DATETIME_ORIGINAL))
    if not raw:
        return None
    try:
        moment = datetime.strptime(raw[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None  # "0000:00:00 00:00:00" and other placeholders cameras write
    subsec = _text(exif_ifd.get(SUBSEC_TIME_ORIGINAL))
    if subsec and subsec.isdigit():
        moment = moment.replace(microsecond=int(subsec[:6].ljust(6, "0")))
    offset = _text(exif_ifd.get(OFFSET_TIME_ORIGINAL))
    if offset and len(offset) == 6 and offset[0] in "+-" and offset[3] == ":":
        try:
            delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
            moment = moment.replace(tzinfo=timezone(delta if offset[0] == "+" else -delta))
        except ValueError:
            pass
    return moment


def read_facts(image: Image.Image) -> ExifFacts:
    """The allow-listed EXIF facts of an opened (not decoded) image."""
    try:
        exif = image.getexif()
    except Exception:  # a malformed EXIF block is not a reason to refuse the photo
        return ExifFacts()
    if not exif:
        return ExifFacts()
    try:
        exif_ifd = exif.get_ifd(IFD_EXIF)
    except Exception:
        exif_ifd = {}
    orientation = exif.get(ORIENTATION, 1)
    try:
        orientation = int(orientation)
    except (TypeError, ValueError):
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    return ExifFacts(
        orientation=orientation,
        make=_text(exif.get(MAKE)),
        model=_text(exif.get(MODEL)),
        software=_text(exif.get(SOFTWARE)),
        lens_model=_text(exif_ifd.get(LENS_MODEL)),
        taken_at=_taken_at(exif_ifd),
        has_gps=IFD_GPS in exif,
    )


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """The image as it should be displayed."""
    method = TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
