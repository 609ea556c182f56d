"""Whole numbers read from request text (query parameters, path segments), the same way for every door.

`str.isdigit()` then `int()` was the check, and neither bounds what it takes: `²` passes isdigit() and int() refuses
it (a 500 where the check was meant to make a 400), int() also takes `٣`, ` 7 ` and `1_000`, and a number past int64
overflowed SQLite's OFFSET (9223372036854775808, 1e30), or past 4,300 digits int()'s own guard. Here a number is 1 to
19 ASCII digits (int64's largest, 9223372036854775807, has 19) in the range its caller names; else NotANumber, which
each door answers as a 400 in its own form.
"""

from __future__ import annotations

INT64_MAX = 2**63 - 1  # the largest integer either database (SQLite, PostgreSQL bigint) holds
MAX_DIGITS = len(str(INT64_MAX))
SHOWN = 40  # characters of a refused value echoed in the message: enough to recognise, never the whole of a long one


class NotANumber(ValueError):
    """The text is not a whole number in the range asked: the message names the parameter, the text and the range."""


def shown(text: str) -> str:
    """The text as a message quotes it: repr(), cut short when long."""
    return repr(text) if len(text) <= SHOWN else f"{text[:SHOWN]!r}... ({len(text)} characters)"


def whole_number(text: str, name: str, *, low: int = 0, high: int = INT64_MAX) -> int:
    """`text` as an int from `low` to `high`, written in ASCII digits only; NotANumber saying so otherwise."""
    if 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit():
        number = int(text)
        if low <= number <= high:
            return number
    raise NotANumber(f"{name}={shown(text)}: must be a whole number from {low} to {high}, in the digits 0-9")
