"""The service's error taxonomy: each error knows its HTTP status and FHIR issue type.

Every non-2xx answer is a FHIR OperationOutcome built from one of these (docs/service-contract.md).
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


class FetchError(ServiceError):
    """Reading the patient's chart failed: raised only by `fetch/`, mapped to HTTP by its status.

    412 by default (the FHIR data cannot be obtained); the subclasses say when the hook request
    itself is at fault (400) or when this process has no capacity left for another fetch (503).
    """

    status = 412
    issue_code = "incomplete"


class PrefetchInvalid(FetchError):
    """What the EHR sent to read the chart with is not usable: prefetch that is not FHIR, a
    malformed access token or patient id (400)."""

    status = 400
    issue_code = "invalid"


class FetchBusy(FetchError):
    """No fetch slot free in this process right now (503; the client may retry after `retry_after`)."""

    status = 503
    issue_code = "transient"

    def __init__(self, diagnostics: str, *, retry_after: int = 1) -> None:
        super().__init__(diagnostics)
        self.retry_after = retry_after


class Overloaded(ServiceError):
    """This worker is at its limit of calls waiting on FHIR servers (503; retry after `retry_after` s)."""

    status = 503
    issue_code = "transient"

    def __init__(self, diagnostics: str, *, retry_after: int = 1) -> None:
        super().__init__(diagnostics)
        self.retry_after = retry_after


class PayloadTooLarge(ServiceError):
    status = 413
    issue_code = "too-long"


def operation_outcome(diagnostics: str, issue_code: str) -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": issue_code, "diagnostics": diagnostics}],
    }
