"""A FHIR request's JSON body (gateway/http/json_body.py), parsed on a worker thread: a large one parsed on the event
loop held every HTTP door (7 s for a 64 MiB body of empty arrays, which took the gateway to 1.9 GB)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.fhir.outcome import FhirError
from gateway.http.json_body import TooComplex, loads_bounded


async def json_body(request: Request) -> Any:
    """The body parsed; FhirError 400 when it is not JSON (or nested too deep), 413 when it holds too much."""
    raw = await request.body()
    try:
        return await run_in_threadpool(loads_bounded, raw)
    except TooComplex as exc:
        raise FhirError(413, f"{exc}: send fewer resources at once") from None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise FhirError(400, "the body is not JSON") from None
