"""A served object in another transfer syntax, for a peer that accepts none it is stored in.

Objects are sent as stored whenever the peer accepts that (Orthanc, transcoding by default, spends ~500 ms a photo
here: peers-measured.md); only a peer that accepts nothing but uncompressed pixels gets the object decoded, by
pydicom's pixel handlers (JPEG Baseline through libjpeg, JPEG-LS through CharLS, RLE natively) into Explicit VR
Little Endian, colour as RGB. LossyImageCompression stays as stored (once lossy, always lossy: PS3.3 C.7.6.1.1.5).
"""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread
from pydicom.uid import UID

from gateway.core.objects.coerce import Served

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)


class CannotTranscode(ValueError):
    """The stored pixel data could not be decoded into the syntax asked for."""


def as_stored(served: Served) -> Dataset:
    """The served object as a data set, Pixel Data still in its stored encoding."""
    return dcmread(io.BytesIO(served.read()))


def uncompressed(served: Served, syntax: str = EXPLICIT_LE) -> Dataset:
    """The served object with its pixels decoded, in Explicit (or Implicit) VR Little Endian."""
    if syntax not in UNCOMPRESSED:
        raise CannotTranscode(f"transcoding only to uncompressed syntaxes, not {syntax}")
    ds = as_stored(served)
    if ds.file_meta.TransferSyntaxUID in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return ds
    try:
        # the same picture in another encoding keeps its SOP Instance UID (PS3.5 10: a transfer syntax change)
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # pydicom's handlers raise several kinds for undecodable data
        raise CannotTranscode(f"the stored pixel data ({served.transfer_syntax}) cannot be decoded: {type(exc).__name__}") from None
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds
