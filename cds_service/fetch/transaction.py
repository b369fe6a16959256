"""POST one FHIR transaction Bundle to a server (for `cds-service fixtures load`), under the same
fhirServer rules as the service's own fetches: https or loopback, the allowlist, no metadata
addresses, the token only to that origin, no redirects followed."""

from __future__ import annotations

import time
from typing import Any

import requests

from cds_service.errors import FetchError
from cds_service.fetch.exchange import retry_delay
from cds_service.fetch.policy import check_fhir_server, check_token
from cds_service.fetch.session import FHIR_JSON, make_session
from cds_service.jsonio import dump_bytes, loads
from cds_service.settings import Settings

RETRIED = frozenset({429, 503})


class TransactionRefused(FetchError):
    """The server answered the transaction with an error (or not at all)."""


def _reason(response: requests.Response) -> str:
    """The server's own words, from its OperationOutcome, made safe for one terminal line."""
    try:
        body = loads(response.content[:65536])
        text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in body.get("issue", [])[:3])
    except Exception:  # not FHIR: the status says enough
        text = ""
    text = "".join(c if c.isprintable() else " " for c in text)[:300]
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


class TransactionClient:
    """One session for many transactions to one server."""

    def __init__(self, base: str, token: str | None, settings: Settings, *, attempts: int = 5) -> None:
        self.base = check_fhir_server(base, settings)
        check_token(token)
        self.attempts = attempts
        self.timeout = max(settings.fhir_timeout_s, 30.0)
        self.session = make_session()
        self.headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.retries = 0  # 429/503 answers waited out, for the caller's report

    def post(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """The transaction-response Bundle; retries 429/503 as the server asks (at most 30 s a wait)."""
        body = dump_bytes(bundle)
        for attempt in range(self.attempts):
            try:
                response = self.session.post(
                    self.base, data=body, headers=self.headers, timeout=self.timeout, allow_redirects=False
                )
            except requests.RequestException as exc:
                raise TransactionRefused(f"no answer from {self.base} ({type(exc).__name__})") from None
            if response.status_code in RETRIED and attempt + 1 < self.attempts:
                self.retries += 1
                time.sleep(min(30.0, retry_delay(response, attempt)))
                continue
            if not 200 <= response.status_code < 300:
                raise TransactionRefused(f"{self.base} refused the transaction: {_reason(response)}")
            try:
                answer = loads(response.content)
            except ValueError:
                raise TransactionRefused(
                    f"{self.base} answered the transaction with something not JSON"
                ) from None
            if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
                raise TransactionRefused(f"{self.base} answered the transaction without a Bundle")
            return answer
        raise TransactionRefused(f"{self.base} kept answering 429/503 (rate-limited)")  # pragma: no cover

    def close(self) -> None:
        self.session.close()
