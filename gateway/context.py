"""The running gateway's shared parts, handed to every door."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.settings import Settings
from store.audit import load_or_create_key
from store.blobs import FileBlobStore
from store.db import Database
from store.spool import Spool, remove_stale


def spool_root(settings: Settings) -> Path:
    """Where every process using this data directory spools (ingest.spool_dir, default DATA_DIR/spool)."""
    return Path(settings.ingest.spool_dir or (Path(settings.data_dir) / "spool"))


@dataclass
class Gateway:
    settings: Settings
    db: Database
    blobs: FileBlobStore
    # this process's spool folder (uploads and temp files while they are checked), made on first use
    spool: Spool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.spool = Spool(spool_root(self.settings))

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True, tidy: bool = True) -> Gateway:
        """Open the store; `tidy` removes what dead processes left (`store check` opens without, to report it)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url, audit_key=load_or_create_key(settings.audit_key_file),
                      audit_anchor_dir=settings.audit_key_file.parent)
        if migrate:
            db.upgrade()
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
