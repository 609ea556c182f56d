"""The REST door's one JSON convention: camelCase keys, times in UTC ISO 8601 with Z, patients by public id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.core.policy.rules import utc


def iso(moment: datetime | None) -> str | None:
    return utc(moment).isoformat().replace("+00:00", "Z") if moment is not None else None


def patient_link(public_id: str | None) -> dict[str, Any] | None:
    """How a response names a patient: the opaque id and where to read it (never the database key)."""
    if public_id is None:
        return None
    return {"id": public_id, "link": f"/api/v1/patients/{public_id}"}
