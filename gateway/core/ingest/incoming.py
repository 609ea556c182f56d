"""A received file written to the spool as its bytes arrive, and hashed on the way (SHA-256: its blob's name), so a
door has nothing left to write or hash once the last byte has come. A C-STORE's
data set (gateway/dicom/spooled.py) and a STOW-RS request's parts (gateway/dicomweb/multipart_in.py) come this way.

Without it a 12-MP photo was gathered first (in memory, or in one spooled request body), then written or copied to
its own spool file (~1.7-2.8 ms) and hashed twice on helper threads while the sender waited for its answer (~2-3.5
ms waited, traced). The SHA-1 FHIR's Attachment.hash gives is not worked out here: that of a received DICOM object
comes with its renditions, after the answer (deferred.py); hashed here as well, it cost the sender ~1.4 ms of a 2.8 MB
photo's STOW-RS (A/B, 12-MP STOW-RS: 38.4 -> 43.4 files/s without it)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

CHUNK = 256 * 1024  # bytes gathered before a write and a digest update: ~13 of each for a 3 MB photo, not ~200


class OverLimit(Exception):
    """More bytes came than the file's limit: those past it were not kept, and the file was emptied."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes received, over the limit")
        self.size = size


class IncomingFile:
    """The bytes written to `path` (opened as `fd`) in order, `head` first, hashed as they go. With a `limit`, bytes
    past it are counted, not kept: a sender cannot fill the spool's disk (and the stores beside it) with one object
    before anything has looked at it; finish() then raises OverLimit."""

    def __init__(self, fd: int, path: Path, head: bytes = b"", limit: int | None = None) -> None:
        self.path = path
        self.size = 0  # bytes given so far, head included
        self.limit = limit
        self._fd: int | None = fd
        self._sha256 = hashlib.sha256()
        self._pending = bytearray()
        self._error: OSError | None = None
        self._lock = threading.Lock()  # a receiving thread writes; another may discard meanwhile
        if head:
            self.write(head)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        over = self.limit is not None and self.size > self.limit
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            if not over:  # this write crossed it: the file is emptied once, the rest only counted
                self._over_limit()
            return len(data)
        if len(data) >= CHUNK:
            # a whole chunk (a C-STORE's PDU of up to 1 MiB) goes from the caller's buffer as it is, after what
            # waits: gathered into _pending first, each MiB was copied once more, into memory allocated anew (3 MiB
            # in 1 MiB writes, median of 60 in turns: 2.64 -> 2.48 ms)
            with self._lock:
                if self._pending:
                    self._flush()
                self._write_out(data)
            return len(data)
        self._pending += data
        if len(self._pending) >= CHUNK:
            with self._lock:
                self._flush()
        return len(data)

    def _flush(self) -> None:
        self._write_out(self._pending)
        self._pending.clear()

    def _write_out(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None or self._error is not None:
            return  # discarded, or the disk refused: the rest goes nowhere either
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(self._fd, view[written:])
        except OSError as exc:  # the disk full: the door answers that it could not store
            self._error = exc
        else:
            self._sha256.update(data)  # hashlib lets go of the GIL for a chunk this size

    def _over_limit(self) -> None:
        """The first byte past the limit: what was kept goes (the file emptied, its disk space freed at once)."""
        with self._lock:
            self._pending.clear()
            if self._fd is not None and self._error is None:
                try:
                    os.ftruncate(self._fd, 0)
                except OSError as exc:
                    self._error = exc

    def finish(self) -> str:
        """The rest written and the file closed: its SHA-256 (hex). Raises OverLimit when more than the limit came
        (the file is then empty), the OSError a write met (the file is then incomplete), or one saying it was
        discarded."""
        with self._lock:
            over = self.limit is not None and self.size > self.limit
            if not over:
                self._flush()
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            if fd is None:
                raise OSError(f"{self.path.name}: discarded before it was finished")
            if over:
                raise OverLimit(self.size)
            if self._error is not None:
                raise self._error
        return self._sha256.hexdigest()

    def discard(self) -> None:
        """Close and remove the file (done twice, nothing more happens)."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._pending.clear()
            if fd is not None:
                os.close(fd)
        self.path.unlink(missing_ok=True)
