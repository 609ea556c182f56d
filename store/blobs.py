"""Content-addressed blob storage.

Blobs are named by the SHA-256 of their bytes and written atomically (temp file,
fsync, rename, fsync of the folder), so a crash never leaves a partial blob under
a real name. Writers stream: a blob is never held in memory whole. Callers write
the blob before the row that references it commits; blobs no row references are
orphans that `clinphoto store check` reports and `clinphoto store gc` removes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int
    mtime: float


class BlobNotFound(KeyError):
    pass


class BlobCorrupt(IOError):
    pass


class BlobStore(Protocol):
    """What every backend offers; an S3-compatible one would map names to object keys."""

    def put_stream(self, chunks: Iterable[bytes]) -> BlobRef: ...
    def adopt(self, path: Path, sha256: str) -> BlobRef: ...
    def put_file(self, fileobj: BinaryIO) -> BlobRef: ...
    def put_bytes(self, data: bytes) -> BlobRef: ...
    def open(self, sha256: str, verify: bool = False) -> BinaryIO: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def mtime(self, sha256: str) -> float: ...
    def delete(self, sha256: str) -> None: ...
    def iter_blobs(self) -> Iterator[BlobInfo]: ...
    def ping(self) -> None: ...


def _is_hex_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


class _VerifyingReader:
    """Hashes as the caller reads; raises at EOF when the bytes are not the named blob."""

    def __init__(self, raw: BinaryIO, expected: str) -> None:
        self._raw, self._expected, self._hash = raw, expected, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        at_end = not data or n is None or n < 0
        if at_end and self._hash.hexdigest() != self._expected:
            raise BlobCorrupt(f"blob {self._expected} does not match its hash")
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileBlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _is_hex_digest(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        # two levels of fan-out keep folders small at millions of blobs
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def _make_folder(self, folder: Path) -> list[Path]:
        """The blob's fan-out folder made if missing: the folders given a new entry (a made folder's parent), to be
        synced with the blob's own, or a crash could lose the folder and the blob in it."""
        made: list[Path] = []
        for level in (folder.parent, folder):
            if not level.is_dir():
                try:
                    level.mkdir()
                except FileExistsError:  # another writer made it meanwhile; its entry may not be durable yet
                    pass
                made.append(level.parent)
        return made

    def put_stream(self, chunks: Iterable[bytes]) -> BlobRef:
        digest = hashlib.sha256()
        size = 0
        # the writer's pid in the name tells a live writer's temp file from a dead one's
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=f"incoming-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            ref = BlobRef(digest.hexdigest(), size)
            final = self.path(ref.sha256)
            if final.exists():
                os.unlink(tmp_name)  # same content already stored
                # fresh mtime: `store gc` spares young blobs, and a new row is about to refer to this one
                os.utime(final)
                return ref
            made = self._make_folder(final.parent)
            os.replace(tmp_name, final)
            for folder in (*made, final.parent):
                _fsync_dir(folder)
            return ref
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise

    def adopt(self, path: Path, sha256: str) -> BlobRef:
        """Store a file the caller wrote in this store's filesystem and will not write again, by a hard link
        rather than a copy (a 3 MB DICOM object was read, written and synced a second time: ~5 ms of a C-STORE's
        ~25). `sha256` must be the file's digest as it is; the caller may unlink its own name afterwards."""
        final = self.path(sha256)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            os.fsync(f.fileno())  # the bytes are durable before any row can name them
        if final.exists():
            os.utime(final)  # same content already stored; fresh mtime as put_stream gives it
            return BlobRef(sha256, size)
        made = self._make_folder(final.parent)
        try:
            os.link(path, final)
        except FileExistsError:  # a concurrent writer of the same content got there first: its name synced too
            pass
        except OSError:  # another filesystem (EXDEV), or one without hard links: copy
            with open(path, "rb") as f:
                return self.put_file(f)
        # Run beside the transaction's statements on a helper thread instead, the folder's fsync gained nothing
        # (A/B, 12-MP C-STORE: 31.5 against 31.1 files/s): the journal commits it and SQLite's fsync in turn anyway.
        for folder in (*made, final.parent):
            _fsync_dir(folder)
        return BlobRef(sha256, size)

    def put_file(self, fileobj: BinaryIO) -> BlobRef:
        return self.put_stream(iter(lambda: fileobj.read(CHUNK), b""))

    def put_bytes(self, data: bytes) -> BlobRef:
        return self.put_stream([data])

    def open(self, sha256: str, verify: bool = False) -> BinaryIO:
        try:
            raw = open(self.path(sha256), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc
        return _VerifyingReader(raw, sha256) if verify else raw  # type: ignore[return-value]

    def read_bytes(self, sha256: str, verify: bool = False) -> bytes:
        with self.open(sha256, verify=verify) as f:
            return f.read()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc

    def mtime(self, sha256: str) -> float:
        try:
            return self.path(sha256).stat().st_mtime
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc

    def delete(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            pass

    def check(self, sha256: str) -> bool:
        """True when the stored bytes hash to their name."""
        digest = hashlib.sha256()
        with self.open(sha256) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def iter_blobs(self) -> Iterator[BlobInfo]:
        # anything that is not a fan-out folder or a digest-named file (e.g. .DS_Store) is not ours
        for first in sorted(self.root.iterdir()):
            if first.name == "tmp" or not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                if not second.is_dir():
                    continue
                for entry in os.scandir(second):
                    if _is_hex_digest(entry.name) and entry.is_file():
                        st = entry.stat()
                        yield BlobInfo(entry.name, st.st_size, st.st_mtime)

    def stale_temp_files(self) -> list[Path]:
        """Temp files left by a writer that died mid-write; they were never visible as blobs."""
        return sorted(p for p in self._tmp.iterdir() if p.name.startswith("incoming-") and not _writer_alive(p.name))

    def remove_stale_temp_files(self) -> int:
        stale = self.stale_temp_files()
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def ping(self) -> None:
        probe = tempfile.NamedTemporaryFile(dir=self._tmp, prefix="ping-")
        probe.close()


def _writer_alive(temp_name: str) -> bool:
    try:
        pid = int(temp_name.split("-")[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
