"""Blob store against database: missing blobs, hash mismatches, orphans; and what dead processes left behind."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, union
from sqlalchemy.orm import Session

from store.blobs import BlobNotFound, FileBlobStore
from store.db import Database
from store.models import Asset
from store.spool import remove_stale, stale_files


def referenced_hashes(session: Session) -> set[str]:
    """Every blob a row points at. Add a column here when a new table references blobs."""
    query: Any = union(
        select(Asset.sha256).where(Asset.original_kept.is_(True)),
        select(Asset.dicom_sha256).where(Asset.dicom_sha256.is_not(None)),
        select(Asset.preview_sha256).where(Asset.preview_sha256.is_not(None)),
        select(Asset.thumbnail_sha256).where(Asset.thumbnail_sha256.is_not(None)),
    )
    return set(session.execute(query).scalars())


@dataclass
class StoreReport:
    blobs: int = 0
    referenced: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    stale_temp: list[str] = field(default_factory=list)
    stale_spool: list[str] = field(default_factory=list)  # received files of a process that is gone (PHI)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.stale_temp or self.stale_spool)

    def summary(self) -> str:
        lines = [f"{self.blobs} blob(s) stored, {self.referenced} referenced"]
        for label, items in (
            ("missing (referenced, not stored)", self.missing),
            ("hash mismatch", self.corrupt),
            ("orphan (stored, not referenced)", self.orphans),
            ("stale temp file (interrupted write)", self.stale_temp),
            ("stale spool file (process gone)", self.stale_spool),
        ):
            lines.append(f"{label}: {len(items)}")
            lines.extend(f"  {item}" for item in items[:50])
        lines.append("clean" if self.clean else "PROBLEMS FOUND")
        return "\n".join(lines)


def check_store(db: Database, blobs: FileBlobStore, verify_hashes: bool = True, spool_root: Path | None = None) -> StoreReport:
    with db.read() as session:
        wanted = referenced_hashes(session)
    report = StoreReport(referenced=len(wanted))
    present = set()
    for info in blobs.iter_blobs():
        present.add(info.sha256)
        if info.sha256 not in wanted:
            report.orphans.append(info.sha256)
        elif verify_hashes and not blobs.check(info.sha256):
            report.corrupt.append(info.sha256)
    report.blobs = len(present)
    report.missing = sorted(wanted - present)
    report.stale_temp = [p.name for p in blobs.stale_temp_files()]
    if spool_root is not None:
        report.stale_spool = [str(p.relative_to(spool_root)) for p in stale_files(spool_root)]
    return report


def collect_garbage(db: Database, blobs: FileBlobStore, older_than: timedelta, now: float, dry_run: bool = False) -> list[str]:
    """Remove orphan blobs and stale temp files older than the given age.

    The age guard matters: a writer stores its blob before the row that references
    it commits, so a young unreferenced blob may be about to become referenced.
    Stale spool files need no age guard (see collect_spool)."""
    cutoff = now - older_than.total_seconds()
    candidates = [info for info in blobs.iter_blobs() if info.mtime < cutoff]
    with db.read() as session:
        wanted = referenced_hashes(session)
    orphans = [info.sha256 for info in candidates if info.sha256 not in wanted]
    stale = [p for p in blobs.stale_temp_files() if p.stat().st_mtime < cutoff]
    if dry_run:
        return orphans + [p.name for p in stale]
    removed = []
    for sha in orphans:
        # a writer that stored this content again since the listing refreshed its mtime
        # (its row may commit any moment): look again just before deleting
        try:
            if blobs.mtime(sha) >= cutoff:
                continue
        except BlobNotFound:
            continue
        blobs.delete(sha)
        removed.append(sha)
    for path in stale:
        path.unlink(missing_ok=True)
    return removed + [p.name for p in stale]


def collect_spool(spool_root: Path, dry_run: bool = False) -> list[str]:
    """Remove what processes that are gone left in the spool, whatever its age: their lock proves them gone."""
    found = stale_files(spool_root) if dry_run else remove_stale(spool_root)
    return [str(p.relative_to(spool_root)) for p in found]
