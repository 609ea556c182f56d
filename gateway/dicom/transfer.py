"""Which form of an object to send on an association: as stored when the peer accepted a presentation context for
its SOP class in the stored transfer syntax, else uncompressed when it accepted that, else none (the sub-operation
fails and is counted). The core does the decoding (gateway/core/objects/transcode.py)."""

from __future__ import annotations

import logging
from typing import Any

from pydicom import Dataset

from gateway.core.objects.coerce import Served
from gateway.core.objects.transcode import UNCOMPRESSED, CannotTranscode, as_stored, uncompressed

log = logging.getLogger("clinphoto.dicom")


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[str]:
    """The transfer syntaxes the peer accepted for sending it objects of `sop_class` (we act as C-STORE SCU)."""
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu and cx.transfer_syntax]


def dataset_for(assoc: Any, served: Served) -> Dataset | None:
    """The object as this association can take it, or None when it accepted no syntax we can send it in."""
    syntaxes = accepted_syntaxes(assoc, served.sop_class_uid)
    if served.transfer_syntax in syntaxes:
        return as_stored(served)
    target = next((s for s in UNCOMPRESSED if s in syntaxes), None)
    if target is None:
        return None
    try:
        return uncompressed(served, target)
    except CannotTranscode as exc:
        log.warning("object not sent: %s", exc)
        return None
