"""FHIR errors: every refusal, bad parameter and failure answers an OperationOutcome with the status that fits."""

from __future__ import annotations

from typing import Any

from gateway.core.refusals import Kind, Refused
from gateway.http.errors import STATUS

FHIR_JSON = "application/fhir+json"

# the core's refusal kinds as FHIR issue types (IssueType value set); the status is the HTTP doors' table, but a
# request FHIR understood and could not process is 422 (FHIR's "Unprocessable Entity")
ISSUE_CODE = {
    Kind.NOT_AUTHENTICATED: "login",
    Kind.AUTH_UNAVAILABLE: "transient",
    Kind.BAD_REQUEST: "invalid",
    Kind.FORBIDDEN: "forbidden",
    Kind.INSUFFICIENT_SCOPE: "forbidden",
    Kind.NOT_FOUND: "not-found",
    Kind.GONE: "deleted",
    Kind.CONFLICT: "conflict",
    Kind.INVALID: "processing",
}
HTTP_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported", 406: "not-supported",
              409: "conflict", 410: "deleted", 412: "conflict", 413: "too-long", 415: "not-supported", 422: "processing",
              503: "transient"}


class FhirError(Exception):
    """An answer that is an OperationOutcome: status, issue type, the text a person reads."""

    def __init__(self, status: int, diagnostics: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code or HTTP_ISSUE.get(status, "exception")
        self.diagnostics = diagnostics
        self.headers = headers or {}

    @classmethod
    def of(cls, refused: Refused) -> FhirError:
        status = 422 if refused.kind == Kind.INVALID else STATUS[refused.kind]
        return cls(status, refused.reason, ISSUE_CODE[refused.kind])


def operation_outcome(issues: list[tuple[str, str, str]]) -> dict[str, Any]:
    """issues: (severity, code, diagnostics)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": s, "code": c, "diagnostics": d} for s, c, d in issues]}
