"""What the core's searches share: `column IN (values)` for each criterion that was asked for."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement


def one_of(pairs: Iterable[tuple[Any, Sequence[Any] | None]]) -> list[ColumnElement[bool]]:
    """For each (column, values) whose values were given (None: not asked), the column is one of them; values
    de-duplicated and sorted, so the same criteria make the same statement (SQLAlchemy's cache, PostgreSQL's plans)."""
    return [column.in_(sorted(set(values))) for column, values in pairs if values is not None]
