"""A served object in another transfer syntax, for a peer that accepts none it is stored in.

Objects are sent as stored whenever the peer accepts that (Orthanc, transcoding by default, spends ~500 ms a photo
here: peers-measured.md); only a peer that accepts nothing but uncompressed pixels gets the object decoded, by
pydicom's pixel handlers (JPEG Baseline through libjpeg, JPEG-LS through CharLS, RLE natively) into Explicit VR
Little Endian, colour as RGB. LossyImageCompression stays as stored (once lossy, always lossy: PS3.3 C.7.6.1.1.5).
"""

from __future__ import annotations

import io
from collections.abc import Callable

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from gateway.core.objects import part10
from gateway.core.objects.coerce import Served

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)


class CannotTranscode(ValueError):
    """The stored pixel data could not be decoded into the syntax asked for."""


def as_stored(served: Served) -> Dataset:
    """The served object as a data set to send as it is stored: the header parsed, the Pixel Data value (fragments or
    native pixels) read from the stored file as it lies and handed to pydicom as a buffer, which it writes out without
    parsing it or copying it again. Parsing and re-encoding the whole object cost ~14 ms of a 2.8 MB photo's ~19 ms in
    a C-GET sub-operation (in process, loaded 2-core machine, the bench's photos). An object with elements after its
    Pixel Data (a signature, padding) is parsed whole, as before."""
    ds = dcmread(io.BytesIO(served.header))
    size = served.source.stat().st_size
    if served.offset >= size:
        return ds  # no Pixel Data: the header is the whole object
    if not served.as_stored:
        return _parsed(served)  # a frame with its metadata left out
    head = part10.Head(dataset=ds, pixel_offset=served.offset, size=size)
    with open(served.source, "rb") as f:
        pixels = part10.pixel_element(f, head)
        if pixels.element_end != size:
            return _parsed(served)
        value = part10.read_range(f, pixels.value_offset, pixels.value_end)
        f.seek(served.offset + 4)
        vr = "OW" if head.implicit_vr else f.read(2).decode("latin-1")  # pixel_element() checked it is OB or OW
    ds["PixelData"] = DataElement(0x7FE00010, vr, io.BytesIO(value), is_undefined_length=pixels.encapsulated)
    return ds


class EncodedDataSet(Dataset):
    """The served object's data set as the bytes to send in its stored transfer syntax (`pieces`: the served header
    after its file meta, then the stored file's bytes from Pixel Data on, read as they lie; nothing parsed or written
    again). As a data set it holds only what names it (SOP Class and Instance UIDs, the transfer syntax in its file
    meta): what a sender needs to choose the presentation context and to report a failed sub-operation. The same
    three are kept as plain strings for a sender that need not look them up as elements."""

    pieces: tuple[memoryview, ...]
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    after_send: Callable[[], None] | None = None  # what its sender is to do once the bytes are written, if anything


# a deflated data set is one stream: the header's and the file's cannot be sent one after the other
_NOT_SPLICEABLE = {"1.2.840.10008.1.2.1.99"}


def encoded_as_stored(served: Served) -> EncodedDataSet | None:
    """The served object's data set, encoded as stored, without parsing it (None for a deflated one: as_stored()).

    With as_stored() the header is parsed and pydicom writes the whole data set out again on sending, while the peer
    waits: a C-GET of the bench's ten 12-MP photos cost the gateway 50-54 ms of CPU that way, 41-42 ms this way
    (/proc, alternate runs)."""
    if served.transfer_syntax in _NOT_SPLICEABLE:
        return None
    header = memoryview(served.header)
    meta_end = part10.META_START + part10.meta_length(served.header)
    tail = served.read_tail()
    encoded = EncodedDataSet()
    encoded.SOPClassUID, encoded.SOPInstanceUID = served.sop_class_uid, served.sop_instance_uid
    encoded.file_meta = FileMetaDataset()
    encoded.file_meta.TransferSyntaxUID = UID(served.transfer_syntax)
    encoded.pieces = (header[meta_end:], memoryview(tail))
    encoded.sop_class_uid, encoded.sop_instance_uid = served.sop_class_uid, served.sop_instance_uid
    encoded.transfer_syntax = served.transfer_syntax
    return encoded


def _parsed(served: Served) -> Dataset:
    """The whole served object parsed (pixels to decode, or elements after them)."""
    return dcmread(io.BytesIO(served.read()))


def uncompressed(served: Served, syntax: str = EXPLICIT_LE) -> Dataset:
    """The served object with its pixels decoded, in Explicit (or Implicit) VR Little Endian."""
    if syntax not in UNCOMPRESSED:
        raise CannotTranscode(f"transcoding only to uncompressed syntaxes, not {syntax}")
    ds = _parsed(served)
    if ds.file_meta.TransferSyntaxUID not in UNCOMPRESSED:
        try:
            # the same picture in another encoding keeps its SOP Instance UID (PS3.5 10: a transfer syntax change)
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # pydicom's handlers raise several kinds for undecodable data
            raise CannotTranscode(f"the stored pixel data ({served.transfer_syntax}) cannot be decoded: "
                                  f"{type(exc).__name__}") from None
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    # the encoding the data set is written in, not only the one its file meta names: pynetdicom refuses to send a
    # data set read as Explicit VR under Implicit VR Little Endian (the syntax every peer takes). Every element is
    # decoded first (iterall), so none is left raw, in the encoding it was read in, to be written as if in the other
    for _ in ds.iterall():
        pass
    ds.set_original_encoding(syntax == IMPLICIT_LE, True, ds.original_character_set)
    return ds
