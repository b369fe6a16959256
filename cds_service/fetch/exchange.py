"""One FHIR request and its answer: redirects on fhirServer's origin, 429/503 paced by the server's
own headers within the call's budget, the body read against the call's byte budget (decompressed
here, so a gzip bomb is counted as what it expands to), and the answer checked to be FHIR.

Every failure is a `Fail` with a generic cause: nothing the server wrote (reason phrase,
OperationOutcome text, resourceType value) reaches a message or a log line.
"""

from __future__ import annotations

import email.utils
import re
import time
import zlib
from typing import Any
from urllib.parse import urljoin

import requests

from cds_service.fetch.budget import CallBudget
from cds_service.fetch.policy import under
from cds_service.fetch.session import FHIR_JSON, Fail, calling_for, transport_failure
from cds_service.jsonio import loads

_MAX_REDIRECTS = 5
_MAX_STATUS_RETRIES = 3
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A retry is pointless unless the next attempt still has this long to run.
_MIN_ATTEMPT_S = 0.05
_CHUNK = 64 * 1024
# Optional searches refused with one of these mean "no data of that kind" (service contract).
REFUSALS = frozenset({400, 401, 403, 404, 405, 501})
_RATELIMIT_RESET = re.compile(r"(?:^|[;,\s])(?:reset|t)\s*=\s*(\d+)", re.IGNORECASE)


def _seconds(value: str | None) -> float | None:
    """A delay header: delta seconds, an HTTP date, or (RateLimit-Reset of some servers) epoch seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        n = float(value)
        return max(0.0, n - time.time()) if n > 1_000_000_000 else n
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def asked_delay(response: requests.Response) -> float | None:
    """How long the server asks us to wait: Retry-After, else RateLimit-Reset, else the reset in a
    structured RateLimit header; None when it does not say."""
    headers = response.headers
    for delay in (_seconds(headers.get("Retry-After")), _seconds(headers.get("RateLimit-Reset"))):
        if delay is not None:
            return delay
    match = _RATELIMIT_RESET.search(headers.get("RateLimit", ""))
    if match:
        return float(match.group(1))
    return None


def retry_delay(response: requests.Response, attempt: int) -> float:
    """The wait the server asks for, else a short exponential backoff."""
    asked = asked_delay(response)
    return asked if asked is not None else min(2.0, 0.1 * 2**attempt)


class Exchange:
    """Requests for one call: fhirServer `base`, the bearer `token`, the call's `budget`."""

    def __init__(self, base: str, token: str | None, budget: CallBudget) -> None:
        self.base = base
        self.token = token
        self.budget = budget

    def _get(self, url: str) -> requests.Response:
        headers = {"Accept": FHIR_JSON}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        remaining = self.budget.remaining()
        try:
            # Redirects by hand: requests would follow them to any host.
            with calling_for(self.budget.tracker):
                return self.budget.session.get(
                    url, headers=headers, timeout=remaining, stream=True, allow_redirects=False
                )
        except requests.RequestException as exc:
            raise transport_failure(exc, past_deadline=self._past_deadline(), answered=False) from None

    def _past_deadline(self) -> bool:
        return self.budget.abort.is_set() or time.monotonic() >= self.budget.deadline

    def send(self, url: str) -> requests.Response:
        redirects = attempts = 0
        while True:
            response = self._get(url)
            status = response.status_code
            if status in RETRY_STATUSES and attempts < _MAX_STATUS_RETRIES:
                asked = asked_delay(response)
                wait_s = retry_delay(response, attempts)
                response.close()
                if time.monotonic() + wait_s + _MIN_ATTEMPT_S > self.budget.deadline:
                    # Service contract §2: a 429, or a 503 that says when to come back, whose wait
                    # runs past the budget is rate-limited (for an optional search: no data of that
                    # kind); any other status still failing is that status.
                    limited = status == 429 or (status == 503 and asked is not None)
                    raise Fail(
                        "rate-limited" if limited else f"HTTP {status}",
                        "throttled" if limited else "transient",
                        detail=f"asked to wait {wait_s:g} s, past the call's time budget",
                    )
                attempts += 1
                if self.budget.abort.wait(wait_s):
                    raise Fail("timeout", "timeout", detail="the call ended while waiting to retry")
                continue
            if not (response.is_redirect and response.headers.get("Location")):
                return response
            response.close()
            redirects += 1
            url = urljoin(url, response.headers["Location"])
            if redirects > _MAX_REDIRECTS or not under(url, self.base):
                raise Fail("refused", detail="a redirect off fhirServer's base URL, or too many")

    def read_body(self, response: requests.Response) -> bytes:
        """The decompressed body, counted against the per-answer limit and the call's byte budget."""
        limit = self.budget.settings.fhir_max_response_bytes
        declared = response.headers.get("Content-Length", "")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            decoder: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            decoder = zlib.decompressobj()
        elif encoding in ("identity", ""):
            decoder = None
            if declared.isdigit() and int(declared) > limit:
                response.close()
                raise Fail("too large", "too-long", detail="Content-Length over the per-answer limit")
        else:
            response.close()
            raise Fail("not FHIR", detail="an unrequested Content-Encoding")
        body = bytearray()

        def take(data: bytes) -> None:
            if len(body) + len(data) > limit:
                raise Fail("too large", "too-long", detail="over the per-answer limit")
            self.budget.spend_bytes(len(data))
            body.extend(data)

        try:
            while True:
                raw = response.raw.read(_CHUNK, decode_content=False)
                if not raw:
                    break
                if decoder is None:
                    take(raw)
                    continue
                data = raw
                while data:
                    # max_length: a few KiB of gzip never expand past what the budget still allows.
                    take(decoder.decompress(data, _CHUNK))
                    data = decoder.unconsumed_tail
                if self._past_deadline():
                    raise Fail("timeout", "timeout", detail="the body did not arrive within the budget")
            if decoder is not None:
                take(decoder.flush())
        except zlib.error:
            raise Fail("not FHIR", detail="undecodable compressed body") from None
        except Fail:
            raise
        except Exception as exc:  # urllib3/socket errors, also from a socket we shut down
            raise transport_failure(exc, past_deadline=self._past_deadline(), answered=True) from None
        finally:
            response.close()
        return bytes(body)

    def get_resource(self, url: str, expect: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """GET one FHIR resource of type `expect`; None for a read of an absent resource."""
        response = self.send(url)
        body_bytes = self.read_body(response)
        status = response.status_code
        content_type = response.headers.get("Content-Type", "").lower()
        try:
            body: Any = loads(body_bytes)
        except ValueError:
            body = None
        looks_html = body is None and ("html" in content_type or body_bytes.lstrip()[:1] == b"<")
        # A 404 web page means a wrong base URL, not an absent resource.
        if missing_ok and status in (404, 410) and not looks_html:
            return None
        if not 200 <= status < 300:
            if status == 429:
                raise Fail("rate-limited", "throttled", detail="still 429 after retries")
            code = "exception" if status >= 500 else "forbidden" if status in (401, 403) else "incomplete"
            raise Fail(f"HTTP {status}", code, detail="an OperationOutcome" if _is_outcome(body) else "")
        if body is None:
            raise Fail(
                "not FHIR", detail="HTML" if looks_html else "empty" if not body_bytes.strip() else "not JSON"
            )
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise Fail("not FHIR", detail="JSON without a resourceType")
        if _is_outcome(body) and expect != "OperationOutcome":
            raise Fail("refused (OperationOutcome)", detail="an OperationOutcome instead of the answer")
        if body["resourceType"] != expect:
            raise Fail("not FHIR", detail=f"another resourceType than {expect}")
        return body


def _is_outcome(body: Any) -> bool:
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
