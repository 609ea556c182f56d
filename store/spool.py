"""Where received files wait while they are checked: one folder per process, gone when the process is.

Uploads, jpegtran output and decoder temp files are PHI at rest. Several processes
may share one data directory (the server, `clinphoto import`, a second server), so
each spools into ROOT/<pid>-<token>/ and holds an exclusive flock on
ROOT/<pid>-<token>.lock for its life. The kernel drops the lock when the process
dies, however it dies (kill -9 included), so a lock that can be taken marks a
folder whose owner is gone: start-up and `clinphoto store gc` remove it,
`clinphoto store check` reports it. A live process's folder is never touched.

Ordering keeps owners and sweepers apart without timeouts: an owner creates and
locks its lock file before its folder (and checks the file it locked is still the
one at that path, in case a sweeper took and deleted it in between); a sweeper
removes a folder before its lock file. So a folder without a lock file is stale.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

LOCK_SUFFIX = ".lock"


class Spool:
    """This process's spool folder under `root`, made (and locked) on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._folder: Path | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def path(self) -> Path:
        """The folder to spool into (for temp files of tools such as jpegtran)."""
        with self._lock:
            if self._folder is None:
                self._folder, self._fd = _claim(self.root)
                # an object dropped without close() still releases its lock (its folder is then stale)
                self._finalizer = weakref.finalize(self, os.close, self._fd)
            return self._folder

    def new_file(self, prefix: str, suffix: str = "") -> tuple[int, Path]:
        """A new empty file in this process's folder: (open fd for writing, path)."""
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=self.path)
        return fd, Path(name)

    def files(self) -> list[Path]:
        """Files this process has spooled and not yet removed."""
        with self._lock:
            folder = self._folder
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder else []

    def close(self) -> None:
        """Remove this process's folder and lock file (at a clean stop; nothing may be spooling)."""
        with self._lock:
            if self._folder is None:
                return
            shutil.rmtree(self._folder, ignore_errors=True)
            Path(f"{self._folder}{LOCK_SUFFIX}").unlink(missing_ok=True)
            if self._finalizer is not None:
                self._finalizer()  # closes the fd: the lock is released
            self._folder = self._fd = None


def _claim(root: Path) -> tuple[Path, int]:
    root.mkdir(parents=True, exist_ok=True)
    while True:
        ident = f"{os.getpid()}-{secrets.token_hex(6)}"
        lock_path = root / f"{ident}{LOCK_SUFFIX}"
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a sweeper holds it for a moment and will delete it: start again
            os.close(fd)
            continue
        if not _still_at(lock_path, fd):  # a sweeper deleted it between our create and our lock
            os.close(fd)
            continue
        folder = root / ident
        folder.mkdir(mode=0o700)
        return folder, fd


def _still_at(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take_if_dead(lock_path: Path) -> int | None:
    """An fd holding the lock when its owner is gone (the caller closes it), else None."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # alive
        os.close(fd)
        return None
    if not _still_at(lock_path, fd):  # another sweeper removed it meanwhile
        os.close(fd)
        return None
    return fd


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())
    return [path] if path.exists() or path.is_symlink() else []


def _stale(root: Path, remove: bool) -> list[Path]:
    if not root.is_dir():
        return []
    found: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.endswith(LOCK_SUFFIX):
            fd = _take_if_dead(entry)
            if fd is None:
                continue
            try:
                folder = root / entry.name[: -len(LOCK_SUFFIX)]
                found.extend(_files_under(folder))
                if remove:
                    shutil.rmtree(folder, ignore_errors=True)  # the folder first, then its lock
                    entry.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif not Path(f"{entry}{LOCK_SUFFIX}").exists():  # looked at now: its owner locks before it makes the folder
            # a folder whose lock is gone, or a file left directly here (by a version that spooled here)
            found.extend(_files_under(entry))
            if remove:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
    return found


def stale_files(root: Path) -> list[Path]:
    """Files spooled by processes that are gone (nothing is removed)."""
    return _stale(Path(root), remove=False)


def remove_stale(root: Path) -> list[Path]:
    """Remove what processes that are gone left in the spool; returns the files that were there."""
    return _stale(Path(root), remove=True)
