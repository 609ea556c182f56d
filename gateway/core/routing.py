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
"""

from __future__ import annotations

from collections.abc import Sequence
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


class RoutingSettings(BaseModel):
    routes: list[Route] = Field(default_factory=list, description="Where new photos are forwarded by C-STORE.")
    max_attempts: int = Field(12, ge=1, description="Tries before an item is dead (shown by `clinphoto outbox list`).")
    first_retry_seconds: float = Field(5.0, gt=0, description="Wait after the first failure; doubled after each further one.")
    max_retry_seconds: float = Field(3600.0, gt=0, description="The longest wait between tries.")
    lease_seconds: float = Field(120.0, gt=0, description="How long a claimed item is left to its sender before another "
                                 "process may take it (a sender killed mid-send).")


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


def delivered(gw: Gateway, item_id: int) -> None:
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(
            status="delivered", delivered_at=now, attempts=OutboxItem.attempts + 1, last_error=None, updated_at=now))


def failed(gw: Gateway, routing: RoutingSettings, item_id: int, error: str) -> str:
    """Count a failed try; the next one after a doubling wait, or dead after max_attempts. Returns the new status."""
    now = datetime.now(timezone.utc)
    with gw.db.write() as session:
        item = session.get(OutboxItem, item_id)
        if item is None or item.status != "pending":
            return item.status if item is not None else "gone"
        item.attempts += 1
        item.last_error = error[:2000]
        item.updated_at = now
        if item.attempts >= routing.max_attempts:
            item.status = "dead"
        else:
            wait = min(routing.first_retry_seconds * 2 ** (item.attempts - 1), routing.max_retry_seconds)
            item.next_attempt_at = now + timedelta(seconds=wait)
        return item.status


def items(gw: Gateway, status: str | None = None, limit: int = 100) -> list[OutboxItem]:
    with gw.db.read() as session:
        query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
        if status:
            query = query.where(OutboxItem.status == status)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


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
