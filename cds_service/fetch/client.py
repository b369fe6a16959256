"""Outbound FHIR REST client: fetch the chart from the EHR's fhirServer when prefetch is missing.

Every search of one hook call runs concurrently inside ONE time budget (`CDS_FHIR_TIMEOUT_S`), so
the call costs the slowest search chain, not the sum. Any failure becomes a 412 (`FetchFailed`)
whose message names the search and the cause, and never carries the access token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from cds_service.errors import FetchError
from cds_service.fetch.policy import check_fhir_server, check_token, origin
from cds_service.fetch.session import (
    DEADLINE,
    FHIR_JSON,
    Fail,
    RetryBudgetExhausted,
    shared_session,
    transport_failure,
)
from cds_service.jsonio import loads
from cds_service.settings import Settings

log = logging.getLogger("cds_service.fhir_client")  # the name operators filter on, kept across the move

_MAX_WORKERS = 10
_MAX_PAGES = 1000
_MAX_REDIRECTS = 5
# Workers time out on their own at the deadline; this grace lets their precise reason win over
# the generic "did not finish in time" of the hard stop.
_GRACE_S = 0.25


@dataclass(frozen=True)
class SearchReport:
    key: str
    query: str  # may hold the patient id: fine for a developer's console, keep it out of logs
    pages: int
    resources: int
    seconds: float
    outcome: str  # "ok", "not found" (a read answering 404/410), or the failure reason


@dataclass
class FetchReport:
    searches: list[SearchReport]
    seconds: float


class FetchFailed(FetchError):
    """A 412 that also carries the account of what was fetched (for `cds-service evaluate`)."""

    def __init__(self, diagnostics: str, *, issue_code: str, report: FetchReport) -> None:
        super().__init__(diagnostics, issue_code=issue_code)
        self.report = report


def _outcome_text(body: Any) -> str:
    """A one-line summary of an OperationOutcome the server sent (truncated, it is untrusted)."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        if isinstance(issue, dict):
            detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            texts.append(" ".join(str(p) for p in (issue.get("code"), detail) if p))
    text = "; ".join(t for t in texts if t)
    return text[:300] + ("…" if len(text) > 300 else "")


_STATUS_HINTS = {
    401: "the access token is missing, expired or not accepted",
    403: "the access token does not allow this search",
    404: "no such search here (is fhirServer the FHIR base URL?)",
    429: "too many requests (still throttled after retries)",
}


class _Fetcher:
    """What one fetch_queries / follow_next_links call shares across its searches."""

    def __init__(
        self, base: str, token: str | None, settings: Settings, session: requests.Session, deadline: float
    ) -> None:
        self.base = base
        self.token = token
        self.settings = settings
        self.session = session
        self.deadline = deadline
        self.abort = threading.Event()  # set when another search failed: stop wasting the budget

    def _remaining(self) -> float:
        if self.abort.is_set():
            raise Fail("abandoned: another search already failed", abandoned=True)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Fail(self._timeout_reason(), "timeout")
        return remaining

    def _timeout_reason(self) -> str:
        return f"the FHIR server did not answer within the {self.settings.fhir_timeout_s:g} s time budget"

    def _check_same_origin(self, url: str, what: str) -> None:
        if origin(url) != origin(self.base):
            host = urlsplit(url).hostname or "?"
            raise Fail(f"{what} to another host ({host}); not following it with the access token")

    def _send(self, url: str) -> requests.Response:
        headers = {"Accept": FHIR_JSON}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(_MAX_REDIRECTS + 1):
            remaining = self._remaining()
            context_token = DEADLINE.set(self.deadline)
            try:
                # Redirects by hand: requests would follow them to any host.
                response = self.session.get(
                    url, headers=headers, timeout=remaining, stream=True, allow_redirects=False
                )
            except RetryBudgetExhausted as exc:
                raise Fail(
                    f"HTTP {exc.status} from the FHIR server; the retry it asks for ({exc.wait_s:g} s) "
                    "does not fit in the remaining time budget",
                    "timeout",
                ) from None
            except requests.RequestException as exc:
                raise transport_failure(exc, self.settings.fhir_timeout_s) from None
            finally:
                DEADLINE.reset(context_token)
            if not (response.is_redirect and response.headers.get("Location")):
                return response
            response.close()
            url = urljoin(url, response.headers["Location"])
            self._check_same_origin(url, f"HTTP {response.status_code} redirect")
        raise Fail("too many redirects")

    def _read_capped(self, response: requests.Response) -> bytes:
        limit = self.settings.fhir_max_response_bytes
        too_big = Fail(f"the answer is larger than the {limit}-byte limit", "too-long")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise too_big
        body = bytearray()
        try:
            # Decoded bytes are counted, so a small gzip bomb is caught too.
            for chunk in response.iter_content(chunk_size=64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise too_big
                if time.monotonic() > self.deadline:
                    raise Fail(self._timeout_reason(), "timeout")
        except requests.RequestException as exc:
            raise transport_failure(exc, self.settings.fhir_timeout_s) from None
        finally:
            response.close()
        return bytes(body)

    def get_resource(self, url: str, expect: str, *, missing_ok: bool = False) -> dict | None:
        """GET one FHIR resource of type `expect`; None for a read of an absent resource."""
        response = self._send(url)
        body_bytes = self._read_capped(response)
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
            hint = _STATUS_HINTS.get(status, "server error" if status >= 500 else "")
            outcome = _outcome_text(body)
            reason = " — ".join(p for p in (f"HTTP {status} {response.reason or ''}".strip(), hint) if p)
            raise Fail(
                reason + (f" (OperationOutcome: {outcome})" if outcome else ""),
                "exception" if status >= 500 or status == 429 else "incomplete",
            )
        if body is None:
            if looks_html:
                raise Fail("the answer is HTML, not FHIR JSON (is fhirServer the FHIR base URL?)")
            raise Fail("the answer is empty" if not body_bytes.strip() else "the answer is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise Fail("the answer is JSON but not a FHIR resource (no resourceType)")
        if body["resourceType"] == "OperationOutcome" and expect != "OperationOutcome":
            raise Fail(f"the server answered an OperationOutcome: {_outcome_text(body) or 'no details'}")
        if body["resourceType"] != expect:
            raise Fail(f"the answer is a {body['resourceType'][:60]}, expected a {expect}")
        return body

    def next_url(self, bundle: dict, current: str) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                url = urljoin(current, str(link["url"]))
                self._check_same_origin(url, "a next-page link points")
                return url
        return None

    def collect(self, first: dict | None, url: str | None) -> tuple[dict, int]:
        """Follow the paging chain from `url` (after the page `first`, if any); the merged Bundle."""
        pages = 0
        entries: list[dict] = []
        seen_urls: set[str] = set()
        seen_ids: set[tuple[Any, Any]] = set()

        def add(page: dict) -> None:
            for entry in page.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict):
                    continue
                # Offset paging over a changing result set can repeat an entry on two pages.
                ident = (resource.get("resourceType"), resource.get("id"))
                if type(ident[0]) is str and type(ident[1]) is str:
                    if ident in seen_ids:
                        continue
                    seen_ids.add(ident)
                entries.append(entry)

        if first is not None:
            add(first)
        while url:
            if url in seen_urls or pages >= _MAX_PAGES:
                raise Fail("the server's paging does not end (a next link repeats, or too many pages)")
            seen_urls.add(url)
            page = self.get_resource(url, "Bundle")
            assert page is not None
            pages += 1
            first = first or page
            add(page)
            url = self.next_url(page, url)
        assert first is not None
        merged = {k: v for k, v in first.items() if k not in ("link", "entry", "total")}
        merged["type"] = first.get("type") or "searchset"
        merged["total"] = sum(1 for e in entries if _search_mode(e) == "match")
        if entries:  # FHIR JSON has no empty arrays
            merged["entry"] = entries
        return merged, pages


def _search_mode(entry: dict) -> Any:
    search = entry.get("search")
    return (search.get("mode") if isinstance(search, dict) else None) or "match"


# --------------------------------------------------------------------------- public API


def _is_read(query: str) -> bool:
    path = query.split("?", 1)[0].strip("/")
    return "?" not in query and len(path.split("/")) >= 2


def _label(query: str) -> str:
    """The resource type of a query; the only part of it that goes into messages (no patient id)."""
    return query.split("?", 1)[0].strip("/").split("/", 1)[0][:60] or "?"


def _run(
    fetcher: _Fetcher,
    tasks: dict[str, tuple[str, Callable[[], tuple[dict | None, int]]]],
    started: float,
) -> tuple[dict[str, dict | None], FetchReport]:
    """Run every task concurrently; stop at the first failure or at the deadline."""
    reports: dict[str, SearchReport] = {}
    results: dict[str, dict | None] = {}

    def work(key: str, query: str, task: Callable[[], tuple[dict | None, int]]) -> None:
        t0 = time.monotonic()
        try:
            value, pages = task()
        except Fail as fail:
            fetcher.abort.set()
            reports[key] = SearchReport(key, query, 0, 0, round(time.monotonic() - t0, 3), fail.reason)
            raise
        count = (
            len(value.get("entry") or [])
            if value and value.get("resourceType") == "Bundle"
            else int(value is not None)
        )
        outcome = "ok" if value is not None else "not found"
        reports[key] = SearchReport(key, query, pages, count, round(time.monotonic() - t0, 3), outcome)
        results[key] = value

    executor = ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(tasks)), thread_name_prefix="fhir")
    futures: dict[Future[None], str] = {
        executor.submit(work, key, query, task): key for key, (query, task) in tasks.items()
    }
    try:
        timeout = max(0.0, fetcher.deadline - time.monotonic()) + _GRACE_S
        done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
    finally:
        # Do not wait for stragglers: their own timeouts end them within the budget.
        executor.shutdown(wait=False, cancel_futures=True)
    failures: list[tuple[str, Fail]] = []
    for future in done:
        exc = future.exception()
        if isinstance(exc, Fail):
            failures.append((futures[future], exc))
        elif exc is not None:
            raise exc
    # A search abandoned because another one failed is noise in the message.
    failures = [f for f in failures if not f[1].abandoned] or failures
    if not failures and pending:
        fetcher.abort.set()
        failures = [(futures[f], Fail(fetcher._timeout_reason(), "timeout")) for f in pending]
    for key, (query, _) in tasks.items():
        reports.setdefault(key, SearchReport(key, query, 0, 0, 0.0, "not finished"))
    report = FetchReport([reports[k] for k in tasks], round(time.monotonic() - started, 3))
    if failures:
        failures.sort(key=lambda kf: list(tasks).index(kf[0]))
        parts = [
            f"{'read' if _is_read(tasks[key][0]) else 'search'} '{key}' ({_label(tasks[key][0])}): {fail.reason}"
            for key, fail in failures
        ]
        message = _redact("Could not fetch FHIR data — " + "; ".join(parts), fetcher.token)
        log.warning("%s", message)
        raise FetchFailed(message, issue_code=failures[0][1].code, report=report)
    for r in report.searches:
        log.info(
            "FHIR %r (%s): %d page(s), %d resource(s), %.3f s, %s",
            r.key,
            _label(r.query),
            r.pages,
            r.resources,
            r.seconds,
            r.outcome,
        )
    return results, report


def _redact(text: str, token: str | None) -> str:
    # Belt and braces: a server may echo the token back in a diagnostic we quote.
    return text.replace(token, "[token]") if token else text


def fetch_queries(
    fhir_server: str,
    token: str | None,
    queries: dict[str, str],
    settings: Settings,
    *,
    session: requests.Session | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, dict | None], FetchReport]:
    """Run the relative FHIR queries concurrently within one time budget.

    Searches come back as one merged searchset Bundle each (every page followed); reads as the
    resource, or None when the server answers 404/410. `deadline` (a time.monotonic() value)
    lets a caller share one budget with other work; by default it is now + settings.fhir_timeout_s.
    Raises FetchFailed (a FetchError, 412) naming the failed searches and why.
    """
    started = time.monotonic()
    base = check_fhir_server(fhir_server, settings)
    check_token(token)
    if not queries:
        return {}, FetchReport([], 0.0)
    fetcher = _open_fetcher(base, token, settings, session, deadline, started)

    def task_for(query: str) -> Callable[[], tuple[dict | None, int]]:
        url = urljoin(base + "/", query.lstrip("/"))

        def run() -> tuple[dict | None, int]:
            fetcher._check_same_origin(url, "the query points")
            if _is_read(query):
                return fetcher.get_resource(url, _label(query), missing_ok=True), 1
            return fetcher.collect(None, url)

        return run

    return _run(fetcher, {key: (query, task_for(query)) for key, query in queries.items()}, started)


def has_next_link(bundle: dict) -> bool:
    """True when a Bundle says more pages follow (a `link` with relation `next`)."""
    links = bundle.get("link") or []
    return isinstance(links, list) and any(
        isinstance(link, dict) and link.get("relation") == "next" for link in links
    )


def _open_fetcher(
    base: str,
    token: str | None,
    settings: Settings,
    session: requests.Session | None,
    deadline: float | None,
    started: float,
) -> _Fetcher:
    # One budget for the whole call unless the caller shares its own deadline.
    budget_end = deadline if deadline is not None else started + settings.fhir_timeout_s
    return _Fetcher(base, token, settings, session or shared_session(), budget_end)


def follow_next_links(
    bundle: dict,
    fhir_server: str,
    token: str | None,
    settings: Settings,
    *,
    key: str = "",
    session: requests.Session | None = None,
    deadline: float | None = None,
) -> dict:
    """Complete a prefetch Bundle the EHR sent with only its first page; the merged Bundle.

    A Bundle without a next link comes back unchanged (no HTTP call, fhir_server not needed).
    """
    if not has_next_link(bundle):
        return bundle
    started = time.monotonic()
    base = check_fhir_server(fhir_server, settings)
    check_token(token)
    fetcher = _open_fetcher(base, token, settings, session, deadline, started)
    key = key or "prefetch"
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    resource_type = next(
        (e["resource"].get("resourceType") for e in entries if isinstance(e.get("resource"), dict)), "Bundle"
    )

    def run() -> tuple[dict | None, int]:
        merged, pages = fetcher.collect(bundle, fetcher.next_url(bundle, base + "/"))
        return merged, pages + 1

    results, _ = _run(fetcher, {key: (f"{resource_type}?(next pages)", run)}, started)
    merged = results[key]
    assert merged is not None
    return merged
