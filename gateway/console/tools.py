"""What the console needs from the HL7 door, handed in by the wiring (gateway/console_tools.py) as callables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.context import Gateway
from gateway.core.operations import Reapply


@dataclass(frozen=True)
class Bench:
    """What a pasted message maps to and the ACK it would get (nothing committed)."""

    report: dict[str, Any]
    ack: str | None
    ok: bool


@dataclass(frozen=True)
class MappingCheck:
    """The mapping file in force, as read now, and whether it validates (each problem with file, line and key)."""

    path: str
    default: bool  # the mapping shipped with the gateway
    name: str | None
    valid: bool
    problems: list[str] = field(default_factory=list)
    summary: str | None = None
    sha256: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Hl7Tools:
    reapply: Reapply  # a stored message applied again with the mapping read afresh
    bench: Callable[[Gateway, bytes, bool], Bench]  # (gw, raw, against the database, rolled back)
    mapping: Callable[[], MappingCheck]
