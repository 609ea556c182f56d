"""Why the pipeline refused something: a stable code plus a message naming the cause.

Protocol-free: each door maps the code to its own form (HTTP status, DIMSE status,
a row in the import's rejected.csv).
"""

from __future__ import annotations

from typing import Any

# codes
UNSUPPORTED_TYPE = "unsupported-type"  # not an image format we accept (sniffed from content)
CORRUPT = "corrupt"  # truncated or damaged image data
TOO_MANY_PIXELS = "too-many-pixels"  # over the pixel limit (from the header, before decoding)
TOO_LARGE = "too-large"  # over the byte limit
NOT_FAITHFUL = "not-faithful"  # cannot be represented truthfully as a VL Photographic Image (or, received, kept and shown)
BAD_METADATA = "bad-metadata"  # a metadata key or value is wrong
UNKNOWN_PATIENT = "unknown-patient"
UNKNOWN_ENCOUNTER = "unknown-encounter"
UNKNOWN_CONSENT = "unknown-consent"
IDEMPOTENCY_CONFLICT = "idempotency-conflict"  # key reused for a different request
NO_FILES = "no-files"
DUPLICATE_INSTANCE = "duplicate-instance"  # a DICOM door sent a known SOP Instance UID with other content
PATIENT_MERGED = "patient-merged"  # the patient was merged into another while the photo was being stored
FORBIDDEN = "forbidden"  # the caller's role may not store photos
INSUFFICIENT_SCOPE = "insufficient-scope"  # the token's scopes do not allow creating photos
# received DICOM objects (gateway/core/ingest/received.py)
SOP_CLASS_NOT_SUPPORTED = "sop-class-not-supported"  # not a photographic storage SOP class we keep
TRANSFER_SYNTAX_NOT_SUPPORTED = "transfer-syntax-not-supported"  # an encoding we cannot keep and serve as it is
INVALID_OBJECT = "invalid-object"  # not Part 10, a required attribute missing, pixels that contradict their description
PATIENT_MISMATCH = "patient-mismatch"  # the items of one request name different patients


class IngestRejected(Exception):
    """Refused input; nothing was stored."""

    def __init__(self, code: str, message: str, *, item: int | None = None, filename: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.item = item
        self.filename = filename
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled whole (a refusal raised in the renderer's worker process comes back through a pipe): Exception's
        # own pickling would call this class with the message alone
        return type(self), (self.code, self.message), self.__dict__

    def to_dict(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"code": self.code, "message": self.message}
        if self.item is not None:
            out["item"] = self.item
        if self.filename:
            out["filename"] = self.filename
        if self.field:
            out["field"] = self.field
        return out

    def for_item(self, index: int, filename: str | None) -> IngestRejected:
        self.item = index
        self.filename = filename
        return self
