"""A FHIR request's JSON body, parsed so that no body can cost the gateway more than a bounded amount.

The edge (gateway/edge.py) bounds the bytes. Parsed as it came, on the event loop, a 64 MiB body of empty arrays
(`[[],[],...]`, 21 million of them) took the gateway to 1.9 GB and held every HTTP door for 7 s; one nested 200,000
deep raised RecursionError, answered 500 and logged as a failure of ours. A resource, or a transaction of photos, has
some hundreds of objects and arrays: past MAX_CONTAINERS the body is refused before it is parsed, and it is parsed on
a worker thread.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.fhir.outcome import FhirError

MAX_CONTAINERS = 100_000  # JSON objects and arrays in one body (counted as "{" and "[", strings' own included)


async def json_body(request: Request) -> Any:
    """The body parsed; FhirError 400 when it is not JSON, 413 past MAX_CONTAINERS."""
    raw = await request.body()
    if raw.count(b"{") + raw.count(b"[") > MAX_CONTAINERS:
        raise FhirError(413, f"the body holds over {MAX_CONTAINERS:,} JSON objects and arrays: send fewer resources at once")
    try:
        return await run_in_threadpool(json.loads, raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise FhirError(400, "the body is not JSON") from None
