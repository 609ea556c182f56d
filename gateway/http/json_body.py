"""JSON from a caller, parsed so that no body costs the gateway more than a bounded amount of memory.

The bytes are bounded where they arrive (gateway/edge.py; a STOW-RS part by its request's limit). What they parse
into is not: a 64 MiB body of empty arrays (`[[],[],...]`) took the gateway to 1.9 GB. A resource, a transaction of
photos, or a STOW-RS request's DICOM JSON metadata holds some hundreds or thousands of objects and arrays: past
MAX_CONTAINERS a body is refused before it is parsed. JSON nested deeper than the parser goes raises RecursionError,
which the caller answers as "not JSON", not as a failure of ours.
"""

from __future__ import annotations

import json
from typing import Any

MAX_CONTAINERS = 100_000  # JSON objects and arrays in one body (counted as "{" and "[", those inside strings too)


class TooComplex(ValueError):
    """More objects and arrays than MAX_CONTAINERS: refused unparsed."""


def loads_bounded(raw: bytes, max_containers: int = MAX_CONTAINERS) -> Any:
    """json.loads, after the count; raises TooComplex, ValueError (not JSON) or RecursionError (too deep)."""
    if raw.count(b"{") + raw.count(b"[") > max_containers:
        raise TooComplex(f"the JSON holds over {max_containers:,} objects and arrays")
    return json.loads(raw)
