"""Blob writes of one ingest (or one rendition job), undone on failure without touching what others use."""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, wait
from pathlib import Path

from sqlalchemy import select

from gateway.core.context import Gateway
from gateway.core.ingest.digests import HELPERS
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
        self.adopting: dict[str, Future[object]] = {}  # adopt_soon's, by digest

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
        """A spooled file the door will only delete, linked in as the blob (see FileBlobStore.adopt); when
        adopt_soon began it, its end waited for (and its failure raised)."""
        pending = self.adopting.pop(sha, None)
        if pending is not None:
            pending.result()
            return sha
        existed = self._hold(sha)
        self.gw.blobs.adopt(path, sha)
        if not existed:
            self.created.append(sha)
        return sha

    def adopt_soon(self, path: Path, sha: str) -> None:
        """adopt() begun now on a helper thread: the file's fsync, its link and its folder's fsync run while the
        pipeline reads the object's header and finds its patient, instead of after (traced, 12-MP C-STORE: ~0.9 ms of
        the ~7 ms the sender waits for, after its last byte). Whatever ends the ingest first, release() or
        remove_unreferenced() waits for it, so the caller never deletes its file under it."""
        if sha in self.adopting:  # the same content twice in one request: one blob
            return
        if not self._hold(sha):
            self.created.append(sha)  # before the link exists: a failure removes whatever part of it was made
        self.adopting[sha] = HELPERS.submit(self.gw.blobs.adopt, path, sha)

    def _settle(self) -> None:
        """Every adoption begun and not yet waited for, ended (its failure is the ingest's, already raised or moot)."""
        if self.adopting:
            wait(list(self.adopting.values()))
            self.adopting.clear()

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
        self._settle()
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
