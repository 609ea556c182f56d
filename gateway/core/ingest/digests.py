"""Digests of stored bytes, and the work a spooled object's later steps need from its file, begun early.

A spooled received object (a C-STORE's or a STOW-RS part's) is hashed twice, SHA-256 (its blob's name) and SHA-1
(FHIR Attachment.hash), and synced to disk before its row commits. Done in turn on the ingesting thread, the hashes
and the fsync took ~6 ms of a 12-MP C-STORE's ~23 ms in the gateway (traced, 2.8 MB photo): none waits on anything
the pipeline decides, so they start on helper threads as soon as the pipeline has the file, and run while this
thread reads its header and finds its patient (hashlib, reads and fsync let go of the GIL).
"""

from __future__ import annotations

import base64
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# shared by every ingest: a task waits its turn when they are all busy, and its result is only asked for later
_HELPERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest-early")


def sha1_base64(data: bytes | Path) -> str:
    """FHIR Attachment.hash: the base64 of the SHA-1 of the bytes (of a file, read in 1 MiB chunks)."""
    digest = hashlib.sha1(usedforsecurity=False)
    if isinstance(data, bytes):
        digest.update(data)
    else:
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def _write_back(path: Path) -> None:
    """The file's bytes to disk now. Only a head start: the blob store syncs the file again before any row names it
    (store.blobs.FileBlobStore.adopt), which then finds nothing left to write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB chunks: a blob's name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Early:
    """A spooled file's SHA-256 (unless the door gave it), its SHA-1 when `want_sha1`, and write-back to disk, under
    way on helper threads."""

    def __init__(self, path: Path, sha256: str | None = None, *, want_sha1: bool = True) -> None:
        self._sha256: str | Future[str] = _HELPERS.submit(sha256_of, path) if sha256 is None else sha256
        self._sha1: Future[str] | None = _HELPERS.submit(sha1_base64, path) if want_sha1 else None
        _HELPERS.submit(_write_back, path)  # nothing waits for it: the blob store's own fsync is the one that counts

    def sha256(self) -> str:
        """The file's SHA-256 (hex), as given or as read; raises as reading the file would have."""
        return self._sha256 if isinstance(self._sha256, str) else self._sha256.result()

    def sha1(self) -> str | None:
        """The file's SHA-1 (base64), None when not wanted; raises as reading the file would have."""
        return self._sha1.result() if self._sha1 is not None else None
