"""Why the core said no: a kind and a reason, never a protocol code.

Each door maps the kinds to its own answers in one table (the REST door to HTTP
statuses, later FHIR to OperationOutcome codes, DIMSE to status codes); the
reason is a sentence the caller may read. A refusal the caller must not learn
the cause of (a hidden photo, a patient without need to know) is NOT_FOUND with
a reason that goes to the audit trail only.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    NOT_AUTHENTICATED = "not-authenticated"  # no credentials, or they did not verify
    AUTH_UNAVAILABLE = "auth-unavailable"  # credentials cannot be checked now (the issuer's keys are unreachable)
    BAD_REQUEST = "bad-request"  # the request itself is malformed (an unknown purpose of use, break-glass without ETREAT)
    FORBIDDEN = "forbidden"  # the caller's role may not do this (a purpose, a service, the original)
    INSUFFICIENT_SCOPE = "insufficient-scope"  # the token's scopes do not grant this interaction
    NOT_FOUND = "not-found"  # absent, or hidden by the policy: the same answer
    GONE = "gone"  # taken out of the record (entered in error); said only to a caller who could otherwise see it
    CONFLICT = "conflict"  # the record's state forbids it (a consent already withdrawn)
    INVALID = "invalid"  # a value breaks a rule (a best-interests consent above record level)


class Refused(Exception):
    """The core refuses; `reason` may be shown to the caller (for NOT_FOUND, `audit_reason` says the real cause)."""

    def __init__(self, kind: Kind, reason: str, *, needs: str | None = None, audit_reason: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.needs = needs  # INSUFFICIENT_SCOPE: the permission wanted, e.g. "Media.s"
        self.audit_reason = audit_reason or reason

    def __str__(self) -> str:
        return self.reason
