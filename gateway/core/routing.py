"""Routing: new photos forwarded to DICOM destinations through a durable outbox in the database.

A rule names a destination (a configured DICOM peer with a port) and which photos go there (specialties,
sensitivities). Matching photos get an outbox row in the same transaction that stores them, so a photo is never
stored without its routing and never routed without being stored. A sender (the DICOM door's router) claims due
rows, sends each photo as the destination's identity may see it (the policy decides at sending time: a photo no
consent covers yet waits and is tried again), and records the outcome: delivered, or tried again later with
exponential backoff, and dead after the configured number of tries. Claiming takes a lease (next_attempt_at moved
on) under a row lock that skips rows another process holds (PostgreSQL SKIP LOCKED; SQLite has one writer), so two
gateway processes never send the same row at once, and a process killed mid-send leaves its rows to be taken again
when the lease ends.

A photo corrected in place (a resend replacing an object whose pixels did not decode: ingest/pipeline.py) is sent
again to each destination that had, or gave up on, its superseded object (requeue_corrected).

A destination routed with `storage_commitment` is also asked to commit what it received (Storage Commitment, push
model): the items sent on an association are "delivered" under one Transaction UID, and "committed" only when the
destination's report names them. A report that names an item as failed, or no report within the timeout, sends it
again (a counted try), since a PACS that will not commit to keeping a photo has not got it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from pydantic import BaseModel, Field
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from gateway.core.context import Gateway
from store.models import Asset, OutboxItem


class Route(BaseModel):
    """New photos matching this go to `destination` (the AE title of a DICOM peer with a port)."""

    destination: str = Field(..., min_length=1, max_length=16)
    specialties: list[str] = Field(default_factory=list, description="NHS Treatment Function codes; empty: every specialty.")
    sensitivities: list[str] = Field(default_factory=lambda: ["N"], description="Which sensitivities go (N, R; never V by rule).")
    storage_commitment: bool = Field(False, description="Ask the destination to commit to keeping what it received "
                                     "(Storage Commitment push model): items are 'committed' only when it confirms.")


class RoutingSettings(BaseModel):
    routes: list[Route] = Field(default_factory=list, description="Where new photos are forwarded by C-STORE.")
    max_attempts: int = Field(12, ge=1, description="Tries before an item is dead (shown by `clinphoto outbox list`).")
    first_retry_seconds: float = Field(5.0, gt=0, description="Wait after the first failure; doubled after each further one.")
    max_retry_seconds: float = Field(3600.0, gt=0, description="The longest wait between tries.")
    lease_seconds: float = Field(120.0, gt=0, description="How long a claimed item is left to its sender before another "
                                 "process may take it (a sender killed mid-send).")
    commitment_timeout_seconds: float = Field(3600.0, gt=0, description="How long a delivered item waits for the destination's "
                                              "Storage Commitment report before it is sent and asked about again.")

    def commits(self, destination: str) -> bool:
        """Whether photos routed to `destination` are to be committed by it (Storage Commitment)."""
        return any(r.storage_commitment for r in self.routes if r.destination == destination)


def enqueue(session: Session, routing: RoutingSettings, rows: Sequence[Asset], now: datetime) -> int:
    """Outbox rows for the new photos the rules route (in the caller's transaction); returns how many."""
    added = 0
    for row in rows:
        for route in routing.routes:
            if row.status != "active" or row.sensitivity not in route.sensitivities:
                continue
            if route.specialties and row.specialty not in route.specialties:
                continue
            session.add(OutboxItem(asset_id=row.id, destination=route.destination, next_attempt_at=now, created_at=now,
                                   updated_at=now))
            added += 1
    return added


# what a correction puts back in the outbox: a destination that has (or gave up on) the superseded object, or may be
# being sent it now (pending: delivered() will not mark it done, and it is due again at once)
_SENT_OR_GIVEN_UP = ("delivered", "committed", "dead", "pending")
CORRECTED = "the stored object was corrected (a resend replaced one whose pixels did not decode): to be sent again"


def requeue_corrected(session: Session, asset_ids: Sequence[str], now: datetime) -> int:
    """A corrected photo goes again to each destination that was sent (or gave up on) its superseded object, in the
    caller's transaction: a PACS holding a copy whose pixels do not decode is what the correction is for. Its items
    are pending again, due now, tries counted afresh; a cancelled one stays cancelled (an operator's decision). A
    pending one may be in a sender's hands with the superseded object: due now, it is sent again once that sender's
    delivered() has found the photo changed. Returns how many."""
    if not asset_ids:
        return 0
    done = session.execute(update(OutboxItem).where(OutboxItem.asset_id.in_(list(asset_ids)),
                                                    OutboxItem.status.in_(_SENT_OR_GIVEN_UP))
                           .values(status="pending", attempts=0, next_attempt_at=now, delivered_at=None, commitment_uid=None,
                                   committed_at=None, last_error=CORRECTED, updated_at=now)
                           .execution_options(synchronize_session=False))
    return cast(CursorResult[Any], done).rowcount


@dataclass(frozen=True)
class Claimed:
    id: int
    asset_id: str
    destination: str
    attempts: int


def claim(gw: Gateway, routing: RoutingSettings, limit: int = 20) -> list[Claimed]:
    """Due items for this process: locked (skipping rows another process holds), leased, committed."""
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        _commitments_overdue(session, routing, now)
        query = (select(OutboxItem).where(OutboxItem.status == "pending", OutboxItem.next_attempt_at <= now)
                 .order_by(OutboxItem.next_attempt_at, OutboxItem.id).limit(limit))
        if gw.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        items = list(session.scalars(query))
        lease = now + timedelta(seconds=routing.lease_seconds)
        for item in items:
            item.next_attempt_at = lease
            item.updated_at = now
        return [Claimed(i.id, i.asset_id, i.destination, i.attempts) for i in items]


def delivered(gw: Gateway, routing: RoutingSettings, sent: Mapping[int, str], commitment_uid: str | None = None) -> None:
    """C-STORE succeeded for these items (`sent`: item id -> the SHA-256 of the stored object that was sent). Without
    a commitment asked they are done; with one they wait (until `commitment_timeout_seconds`) for the destination's
    report under `commitment_uid`. Committed before the N-ACTION is sent, so a report, however quick, finds its items.
    An item whose photo was corrected while it was being sent (the photo names another object now) is not done: it
    stays pending, due again (requeue_corrected), and the corrected object goes next."""
    if not sent:
        return
    now = datetime.now(timezone.utc)
    deadline = now + timedelta(seconds=routing.commitment_timeout_seconds)
    with gw.db.write() as session:
        for item_id, object_sha256 in sent.items():
            still_that_object = select(Asset.id).where(Asset.id == OutboxItem.asset_id,
                                                       Asset.dicom_sha256 == object_sha256).exists()
            session.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.status == "pending",
                                                     still_that_object).values(
                status="delivered", delivered_at=now, attempts=OutboxItem.attempts + 1, last_error=None, updated_at=now,
                commitment_uid=commitment_uid, next_attempt_at=deadline if commitment_uid else now))


@dataclass(frozen=True)
class CommitmentReport:
    """What a destination's Storage Commitment report (N-EVENT-REPORT) says of one transaction."""

    destination: str
    transaction_uid: str
    committed: list[str]  # SOP Instance UIDs
    failed: list[tuple[str, int]]  # SOP Instance UID and the failure reason (PS3.4 J.3.3 Failure Reason)


def commitment_reported(gw: Gateway, routing: RoutingSettings, report: CommitmentReport) -> int:
    """Record a destination's report: the items it names as committed are done; those it names as failed are sent
    again (a counted try, dead after max_attempts). Only items delivered to that destination under that
    transaction are touched (another peer cannot commit for it). Returns how many items the report settled."""
    now = datetime.now(timezone.utc)
    named = set(report.committed) | {uid for uid, _ in report.failed}
    if not named:
        return 0
    reasons = dict(report.failed)
    settled = 0
    with gw.db.write() as session:
        rows = session.execute(
            select(OutboxItem, Asset.sop_instance_uid).join(Asset, Asset.id == OutboxItem.asset_id)
            .where(OutboxItem.commitment_uid == report.transaction_uid, OutboxItem.destination == report.destination,
                   OutboxItem.status == "delivered", Asset.sop_instance_uid.in_(named)))
        for item, sop_uid in rows:
            settled += 1
            if sop_uid in reasons:
                _retry_later(item, routing, now, f"{report.destination} did not commit to keeping it "
                             f"(Storage Commitment failure reason 0x{reasons[sop_uid] & 0xFFFF:04X}): sent again")
            else:
                item.status, item.committed_at, item.updated_at = "committed", now, now
    return settled


def commitment_unasked(gw: Gateway, item_ids: Sequence[int], error: str) -> None:
    """The destination would not take the commitment request: the items stay delivered (they did arrive) with the
    reason noted, and the commitment timeout sends them again."""
    with gw.db.write() as session:
        session.execute(update(OutboxItem).where(OutboxItem.id.in_(item_ids), OutboxItem.status == "delivered")
                        .values(last_error=error[:2000]))


def _commitments_overdue(session: Session, routing: RoutingSettings, now: datetime) -> None:
    """Delivered items whose destination sent no commitment report in time: sent again (a counted try)."""
    overdue = session.scalars(select(OutboxItem).where(OutboxItem.status == "delivered", OutboxItem.commitment_uid.is_not(None),
                                                       OutboxItem.committed_at.is_(None), OutboxItem.next_attempt_at <= now))
    for item in overdue:
        _retry_later(item, routing, now, f"no Storage Commitment report from {item.destination} within "
                     f"{routing.commitment_timeout_seconds:g} s: sent again", wait=False)  # the timeout was the wait


def _retry_later(item: OutboxItem, routing: RoutingSettings, now: datetime, error: str, wait: bool = True) -> None:
    """Back to pending after the doubling wait for this many tries (or at once), dead when the tries are used up."""
    item.last_error = error[:2000]
    item.updated_at = now
    item.status = "pending"
    item.commitment_uid = None
    if item.attempts >= routing.max_attempts:
        item.status = "dead"
    elif wait:
        pause = min(routing.first_retry_seconds * 2 ** max(item.attempts - 1, 0), routing.max_retry_seconds)
        item.next_attempt_at = now + timedelta(seconds=pause)
    else:
        item.next_attempt_at = now


def failed(gw: Gateway, routing: RoutingSettings, item_id: int, error: str) -> str:
    """Count a failed try; the next one after a doubling wait, or dead after max_attempts. Returns the new status."""
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        item = session.get(OutboxItem, item_id)
        if item is None or item.status != "pending":
            return item.status if item is not None else "gone"
        item.attempts += 1
        _retry_later(item, routing, now, error)
        return item.status


def items(gw: Gateway, status: str | None = None, limit: int = 100) -> list[OutboxItem]:
    with gw.db.read() as session:
        query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
        if status:
            query = query.where(OutboxItem.status == status)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def status(gw: Gateway, item_id: int) -> str | None:
    """The item's status, or None when there is no such item."""
    with gw.db.read() as session:
        return session.scalar(select(OutboxItem.status).where(OutboxItem.id == item_id))


def retry(gw: Gateway, item_id: int) -> bool:
    """A dead (or cancelled) item back to pending, due now, its tries counted afresh."""
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        done = session.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.status.in_(["dead", "cancelled"]))
                               .values(status="pending", attempts=0, next_attempt_at=now, updated_at=now))
        return bool(cast(CursorResult[Any], done).rowcount)


def cancel(gw: Gateway, item_id: int) -> bool:
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        done = session.execute(update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.status.in_(["pending", "dead"]))
                               .values(status="cancelled", updated_at=now))
        return bool(cast(CursorResult[Any], done).rowcount)
