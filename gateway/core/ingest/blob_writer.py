"""Blob writes of one ingest (or one rendition job), undone on failure without touching what others use."""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select

from gateway.core.context import Gateway
from store.blobs import BlobRef
from store.models import Asset

log = logging.getLogger(__name__)

# Content-addressed blobs can be shared by concurrent ingests (the same photo sent
# twice at once, or the same file for two patients). A blob is "held" from just
# before its put until the holder's transaction has ended, and a failed ingest
# never deletes a blob another ingest in this process holds. (The gateway is one
# process; anything left by a crash is an orphan for `clinphoto store gc`.)
_HELD: collections.Counter[str] = collections.Counter()
_HELD_LOCK = threading.Lock()


class BlobWriter:
    """Puts blobs, remembers which ones this call created, removes them again on failure."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.created: list[str] = []
        self.held: list[str] = []
        self.superseded: list[str] = []  # blobs a row this call updates stops naming (see remove_superseded)

    def _hold(self, sha: str) -> bool:
        """Hold `sha`; returns whether the blob already existed."""
        with _HELD_LOCK:
            _HELD[sha] += 1
            self.held.append(sha)
            return self.gw.blobs.exists(sha)

    def put_path(self, path: Path, sha: str) -> str:
        existed = self._hold(sha)
        with open(path, "rb") as f:
            ref = self.gw.blobs.put_file(f)
        if not existed:
            self.created.append(ref.sha256)
        return ref.sha256

    def adopt(self, path: Path, sha: str) -> str:
        """A spooled file the door will only delete, linked in as the blob (see FileBlobStore.adopt)."""
        existed = self._hold(sha)
        self.gw.blobs.adopt(path, sha)
        if not existed:
            self.created.append(sha)
        return sha

    def put_new_stream(self, chunks: Iterable[bytes]) -> BlobRef:
        """For content that is new by construction (a DICOM object with a fresh instance UID and creation time)."""
        ref = self.gw.blobs.put_stream(chunks)
        self.created.append(ref.sha256)
        return ref

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        existed = self._hold(sha)
        self.gw.blobs.put_bytes(data)
        if not existed:
            self.created.append(sha)
        return sha

    def release(self) -> None:
        with _HELD_LOCK:
            for sha in self.held:
                _HELD[sha] -= 1
                if _HELD[sha] <= 0:
                    del _HELD[sha]
        self.held.clear()

    def remove_unreferenced(self) -> None:
        """After a failure: delete what we created unless a committed row or another ingest uses it."""
        self.release()
        self.superseded.clear()  # the rows naming them were not updated
        _delete_unused(self.gw, self.created)
        self.created.clear()

    def remove_superseded(self) -> None:
        """After the commit that stopped naming them (never before: a crash then would leave a row naming nothing):
        delete the superseded blobs unless another row or ingest uses them. Not done (a crash, the database away):
        they are orphans, as any blob write's, for `clinphoto store gc`."""
        try:
            _delete_unused(self.gw, self.superseded)
        except Exception as exc:  # stored and committed all the same: the caller's answer must not change
            log.warning("superseded blob(s) left for `clinphoto store gc`: %s", type(exc).__name__)
        self.superseded.clear()


def _delete_unused(gw: Gateway, shas: list[str]) -> None:
    """Delete those of `shas` no committed row names and no ingest in this process holds."""
    if not shas:
        return
    with _HELD_LOCK:
        with gw.db.read() as session:
            used = {sha for sha in shas if _HELD.get(sha)}
            for column in (Asset.sha256, Asset.dicom_sha256, Asset.preview_sha256, Asset.thumbnail_sha256):
                used.update(sha for sha in session.execute(select(column).where(column.in_(shas))).scalars() if sha)
        for sha in shas:
            if sha not in used:
                gw.blobs.delete(sha)
