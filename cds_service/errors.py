"""The service's error taxonomy: each error knows its HTTP status and FHIR issue type.

Every non-2xx answer is a FHIR OperationOutcome built from one of these (service contract §2).
Messages are for humans and must never carry PHI, tokens or stack traces.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    issue_code: str = "exception"

    def __init__(self, diagnostics: str, *, issue_code: str | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        if issue_code:
            self.issue_code = issue_code


class BadRequest(ServiceError):
    """The CDS Hooks request is malformed or invalid (400)."""

    status = 400
    issue_code = "invalid"


class Unauthorized(ServiceError):
    """The client JWT is missing or invalid (401). The message stays generic."""

    status = 401
    issue_code = "security"


class NotFound(ServiceError):
    status = 404
    issue_code = "not-found"


class DataUnavailable(ServiceError):
    """The FHIR data the service needs cannot be obtained (412, a SHALL of CDS Hooks 2.0)."""

    status = 412
    issue_code = "incomplete"


class PayloadTooLarge(ServiceError):
    status = 413
    issue_code = "too-long"


def operation_outcome(diagnostics: str, issue_code: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": issue_code, "diagnostics": diagnostics}],
    }
