"""A C-STORE request's data set written to the spool as it arrives, behind its file meta, and hashed on the way.

pynetdicom gathers a data set in memory (a BytesIO) and hands it over once its last fragment has come; the door then
wrote it to the spool (~1.7 ms for a 12-MP photo) and the ingest hashed it twice, SHA-256 and SHA-1 (~3 ms on helper
threads, waited for): all after the peer had sent its last byte and while it waited for the answer. Here the DUL
thread, which reads the fragments, writes each CHUNK to the spool file and feeds both digests as it goes, while the
peer is still sending; when the message is complete only the last chunk is left. (pynetdicom's own option,
STORE_RECV_CHUNKED_DATASET, writes and flushes every fragment to a temporary file outside the spool and hashes
nothing.)

The object is a BytesIO because pynetdicom's C-STORE primitive takes nothing else as its data set; it holds nothing
itself. The C-STORE handler takes the file (`finish`) or throws it away (`discard`); an association that ends
mid-message discards it (reactor.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from io import BytesIO
from pathlib import Path

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

CHUNK = 256 * 1024  # bytes gathered before a write and a digest update: ~13 of each for a 3 MB photo, not ~200


def part10_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The preamble, "DICM" and the file meta pynetdicom would put before the data set (event.file_meta)."""
    meta = create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid),
                            transfer_syntax=UID(transfer_syntax))
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta)


class SpooledDataSet(BytesIO):
    """The data set of one C-STORE request, spooled to `path` (opened as `fd`) behind `head` as it is received."""

    def __init__(self, fd: int, path: Path, head: bytes) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = fd
        self._sha256 = hashlib.sha256()
        self._sha1 = hashlib.sha1(usedforsecurity=False)
        self._pending = bytearray(head)
        self._error: OSError | None = None
        self._lock = threading.Lock()  # the DUL thread writes; the association's thread may discard meanwhile

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # BytesIO's takes any buffer
        self._pending += data
        if len(self._pending) >= CHUNK:
            with self._lock:
                self._flush()
        return len(data)

    def _flush(self) -> None:
        pending = self._pending
        if self._fd is None or self._error is not None:
            pending.clear()  # discarded, or the disk refused: the rest goes nowhere either
            return
        try:
            view = memoryview(pending)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            finally:
                view.release()
        except OSError as exc:  # the disk full: the handler answers Out of Resources
            self._error = exc
        else:
            self._sha256.update(pending)  # hashlib lets go of the GIL for a chunk this size
            self._sha1.update(pending)
        pending.clear()

    def finish(self) -> tuple[str, str]:
        """The rest written and the file closed: its SHA-256 (hex) and SHA-1 (base64, FHIR Attachment.hash). Raises
        the OSError a write met (the file is then incomplete)."""
        with self._lock:
            self._flush()
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            if self._error is not None:
                raise self._error
            if fd is None:
                raise OSError(f"{self.path.name}: discarded before it was finished")
        return self._sha256.hexdigest(), base64.b64encode(self._sha1.digest()).decode()

    def discard(self) -> None:
        """Close and remove the file (the request will not be stored; done twice, nothing more happens)."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._pending.clear()
            if fd is not None:
                os.close(fd)
        self.path.unlink(missing_ok=True)
