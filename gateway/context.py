"""The running gateway's shared parts, handed to every door."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import Settings
from store.audit import load_or_create_key
from store.blobs import FileBlobStore
from store.db import Database


@dataclass
class Gateway:
    settings: Settings
    db: Database
    blobs: FileBlobStore

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> Gateway:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url, audit_key=load_or_create_key(settings.audit_key_file),
                      audit_anchor_dir=settings.audit_key_file.parent)
        if migrate:
            db.upgrade()
        blobs = FileBlobStore(settings.blob_dir)
        # a writer killed mid-write leaves a temp file, never a partial blob: tidy it
        blobs.remove_stale_temp_files()
        return cls(settings=settings, db=db, blobs=blobs)

    def close(self) -> None:
        self.db.dispose()
