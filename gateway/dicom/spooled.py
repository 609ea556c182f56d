"""A C-STORE request's data set written to the spool as it arrives, behind its file meta, and hashed on the way.

pynetdicom gathers a data set in memory (a BytesIO) and hands it over once its last fragment has come; the door then
wrote it to the spool (~1.7 ms for a 12-MP photo) and the ingest hashed it twice, SHA-256 and SHA-1 (~3 ms on helper
threads, waited for): all after the peer had sent its last byte and while it waited for the answer. Here the DUL
thread, which reads the fragments, hands each to a core IncomingFile (written and hashed a chunk at a time) while the
peer is still sending; when the message is complete only the last chunk is left. (pynetdicom's own option,
STORE_RECV_CHUNKED_DATASET, writes and flushes every fragment to a temporary file outside the spool and hashes
nothing.)

The object is a BytesIO because pynetdicom's C-STORE primitive takes nothing else as its data set; it holds nothing
itself. The C-STORE handler takes the file (`finish`) or throws it away (`discard`); an association that ends
mid-message discards it (reactor.py).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from gateway.core.ingest.incoming import IncomingFile


def part10_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The preamble, "DICM" and the file meta pynetdicom would put before the data set (event.file_meta)."""
    meta = create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid),
                            transfer_syntax=UID(transfer_syntax))
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta)


class SpooledDataSet(BytesIO):
    """The data set of one C-STORE request, spooled to `path` (opened as `fd`) behind `head` as it is received."""

    def __init__(self, fd: int, path: Path, head: bytes, limit: int | None = None) -> None:
        super().__init__()
        self.incoming = IncomingFile(fd, path, head, limit)
        self.path = path

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # BytesIO's takes any buffer
        return self.incoming.write(data)

    def finish(self) -> str:
        """See IncomingFile.finish: the SHA-256 (hex) of the Part 10 file; OverLimit past the limit."""
        return self.incoming.finish()

    def discard(self) -> None:
        self.incoming.discard()


class Unkept(BytesIO):
    """The data set of a C-STORE request the spool had no file for: its fragments are counted, not kept in memory
    (pynetdicom's way, unbounded); the handler answers Out of Resources."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # BytesIO's takes any buffer
        self.size += len(data)
        return len(data)
