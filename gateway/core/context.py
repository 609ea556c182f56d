"""The running gateway's shared parts (store, blobs, spool, the core's settings), handed to every door.

The core names only the settings it reads (CoreSettings); the wiring's Settings, which also
holds every door's own settings, fits it without the core knowing about the doors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.core import patient_refs
from store.audit import load_or_create_key
from store.blobs import FileBlobStore
from store.db import Database
from store.migrate import upgrade
from store.spool import Spool, remove_stale

if TYPE_CHECKING:  # names for the type checker only: the context holds settings, it does not build them
    from gateway.core.ingest_settings import IngestSettings
    from gateway.core.policy.settings import AuthSettings, PolicySettings
    from gateway.core.routing import RoutingSettings


class CoreSettings(Protocol):
    """The settings the core reads (gateway.settings.Settings has them all)."""

    data_dir: Path
    database_url: str
    blob_dir: Path
    audit_key_file: Path
    uid_root: str
    ae_title: str
    api_keys: dict[str, str]
    policy: PolicySettings
    ingest: IngestSettings
    auth: AuthSettings
    routing: RoutingSettings
    trust_mrn_system: str | None


def spool_root(settings: CoreSettings) -> Path:
    """Where every process using this data directory spools (ingest.spool_dir, default DATA_DIR/spool)."""
    return Path(settings.ingest.spool_dir or (Path(settings.data_dir) / "spool"))


@dataclass
class Gateway:
    settings: CoreSettings
    db: Database
    blobs: FileBlobStore
    # this process's spool folder (uploads and temp files while they are checked), made on first use
    spool: Spool = field(init=False, repr=False)
    # set when an ingest leaves renditions due: wakes this process's renderer (gateway/core/ingest/deferred.py)
    renditions_wanted: threading.Event = field(init=False, repr=False, default_factory=threading.Event)
    # time.monotonic() of this process's last ingest begun or ended, and how many are under way: the renderer gives
    # way to senders meanwhile
    ingest_seen_at: float = field(init=False, repr=False, default=0.0)
    ingests_running: int = field(init=False, repr=False, default=0)
    # time.monotonic() of the last ingest begun after senders were quiet `ingest_quiet_seconds` or more (the
    # renderer's quiet_seconds, which it sets): a pause the renderer may not have seen, every thread of it busy
    ingest_paused_at: float = field(init=False, repr=False, default=0.0)
    ingest_quiet_seconds: float = field(init=False, repr=False, default=0.25)
    _ingest_lock: threading.Lock = field(init=False, repr=False, compare=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.spool = Spool(spool_root(self.settings))
        # read by patient_refs.resolve wherever only a session is at hand (every door's `mrn|...`)
        self.db.shared[patient_refs.TRUST_MRN_SYSTEM] = self.settings.trust_mrn_system

    @contextmanager
    def ingesting(self) -> Iterator[None]:
        """An ingest under way: a sender waits (ingest_seen_at, ingests_running, ingest_paused_at), however it ends."""
        self._ingest_seen(1)
        try:
            yield
        finally:
            self._ingest_seen(-1)

    def _ingest_seen(self, step: int) -> None:
        with self._ingest_lock:
            now = time.monotonic()
            if step > 0 and not self.ingests_running and now - self.ingest_seen_at >= self.ingest_quiet_seconds:
                self.ingest_paused_at = now
            self.ingests_running += step
            self.ingest_seen_at = now

    @classmethod
    def open(cls, settings: CoreSettings, *, migrate: bool = True, tidy: bool = True) -> Gateway:
        """Open the store; `tidy` removes what dead processes left (`store check` opens without, to report it)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url, audit_key=load_or_create_key(settings.audit_key_file),
                      audit_anchor_dir=settings.audit_key_file.parent)
        if migrate:
            upgrade(db)
        blobs = FileBlobStore(settings.blob_dir)
        if tidy:
            # a writer killed mid-write leaves a temp file, never a partial blob; a process killed
            # mid-upload leaves its spool folder (PHI at rest): both belong to processes now gone
            blobs.remove_stale_temp_files()
            remove_stale(spool_root(settings))
        return cls(settings=settings, db=db, blobs=blobs)

    def close(self) -> None:
        self.spool.close()
        self.db.dispose()
