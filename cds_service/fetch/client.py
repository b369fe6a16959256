"""Outbound FHIR REST client: fetch the chart from the EHR's fhirServer when prefetch is missing.

Every search of one hook call runs concurrently inside ONE time budget (`CDS_FHIR_TIMEOUT_S`), so
the call costs the slowest search chain, not the sum. Any failure becomes a 412 (`DataUnavailable`)
whose message names the search and the cause, and never carries the access token.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cds_service.errors import BadRequest, DataUnavailable
from cds_service.jsonio import loads
from cds_service.settings import Settings
from cds_service.urls import is_loopback

log = logging.getLogger("cds_service.fhir_client")  # the name operators filter on, kept across the move

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_MAX_WORKERS = 10
_MAX_PAGES = 1000
_MAX_REDIRECTS = 5
# A retry is pointless unless the next attempt still has this long to run.
_MIN_ATTEMPT_S = 0.05
# Workers time out on their own at the deadline; this grace lets their precise reason win over
# the generic "did not finish in time" of the hard stop.
_GRACE_S = 0.25

# The deadline of the fetch running in this thread, read by the retry policy (shared, immutable
# Retry objects cannot carry per-call state; a context variable can).
_DEADLINE: ContextVar[float | None] = ContextVar("fhir_deadline", default=None)


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


class FetchFailed(DataUnavailable):
    """A 412 that also carries the account of what was fetched (for `cds-service evaluate`)."""

    def __init__(self, diagnostics: str, *, issue_code: str, report: FetchReport) -> None:
        super().__init__(diagnostics, issue_code=issue_code)
        self.report = report


class _Fail(Exception):
    """One search's failure, turned into a FetchFailed by the caller's thread."""

    def __init__(self, reason: str, code: str = "incomplete", *, abandoned: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.abandoned = abandoned  # stopped because another search failed: not a cause itself


class _RetryBudgetExhausted(Exception):
    def __init__(self, status: int | None, wait_s: float) -> None:
        super().__init__(status, wait_s)
        self.status = status
        self.wait_s = wait_s


class _BudgetRetry(Retry):
    """urllib3's Retry, except that it gives up instead of sleeping past the call's deadline."""

    # 413 would be retried on a Retry-After by default; a too-large answer will not shrink.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def sleep(self, response: Any = None) -> None:
        wait_s: float | None = None
        if response is not None and self.respect_retry_after_header:
            try:
                wait_s = self.get_retry_after(response)
            except urllib3.exceptions.InvalidHeader:
                wait_s = None
        if not wait_s:
            wait_s = self.get_backoff_time()
        deadline = _DEADLINE.get()
        if deadline is not None and time.monotonic() + wait_s + _MIN_ATTEMPT_S > deadline:
            raise _RetryBudgetExhausted(getattr(response, "status", None), wait_s)
        if wait_s > 0:
            time.sleep(wait_s)


def make_session(pool_maxsize: int = 32) -> requests.Session:
    """A pooled Session with the retry policy; thread-safe for our GET-only use."""
    retry = _BudgetRetry(
        total=3,
        connect=0,  # a refused connection should fail fast with a clear 412, not back off
        read=0,
        other=0,
        status=3,
        backoff_factor=0.1,
        backoff_max=2.0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # we want the final response to report its status
    )
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=pool_maxsize, max_retries=retry)
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # One session serves many patients and tokens: a cookie from one call must not ride on another.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.headers.update({"Accept": FHIR_JSON, "User-Agent": "crc-cds-service"})
    return session


@functools.cache
def shared_session() -> requests.Session:
    """The process-wide pooled session (connections are reused across hook calls)."""
    return make_session()


# --------------------------------------------------------------------------- fhirServer checks


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _under(url: str, base: str) -> bool:
    """Is `url` the base URL `base` or below it (path-segment aware)?"""
    if _origin(url) != _origin(base):
        return False
    path, base_path = urlsplit(url).path.rstrip("/"), urlsplit(base.strip()).path.rstrip("/")
    return path == base_path or path.startswith(base_path + "/")


def check_fhir_server(url: str | None, settings: Settings) -> str:
    """Validate the EHR-given fhirServer base URL; return it normalised (no trailing slash)."""
    if not url or not url.strip():
        raise DataUnavailable("The request has no fhirServer, so the missing prefetch cannot be fetched")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise DataUnavailable("fhirServer is not an http(s) URL", issue_code="invalid")
    if parts.username or parts.password:
        # Do not echo it: the URL itself carries credentials.
        raise DataUnavailable("fhirServer must not carry credentials in the URL", issue_code="security")
    if _origin(url)[2] == -1:
        raise DataUnavailable("fhirServer has an invalid port", issue_code="invalid")
    if parts.query or parts.fragment:
        raise DataUnavailable(
            "fhirServer must be a FHIR base URL without query or fragment", issue_code="invalid"
        )
    normalised = f"{scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    if scheme == "http" and not is_loopback(parts.hostname) and not settings.allow_insecure_fhir:
        raise DataUnavailable(
            f"fhirServer {normalised} uses plain http; https is required except on loopback "
            "(or set CDS_ALLOW_INSECURE_FHIR=true)",
            issue_code="security",
        )
    allowlist = settings.fhir_server_allowlist
    if allowlist and not any(_under(normalised, allowed) for allowed in allowlist):
        raise DataUnavailable(
            f"fhirServer {normalised} is not in CDS_FHIR_SERVER_ALLOWLIST", issue_code="security"
        )
    return normalised


def _check_token(token: str | None) -> None:
    # A token with spaces or control characters would make requests raise an error quoting it.
    if token is not None and (not token or any(not 33 <= ord(c) <= 126 for c in token)):
        raise BadRequest("fhirAuthorization.access_token is not a valid bearer token")


# --------------------------------------------------------------------------- one search chain


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(
            [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        )


def _transport_failure(exc: requests.RequestException, budget_s: float) -> _Fail:
    causes = list(_causes(exc))
    # Refusal and DNS first: urllib3's NewConnectionError subclasses its ConnectTimeoutError.
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return _Fail("connection refused (is the FHIR server running at fhirServer?)", "exception")
    if any(isinstance(c, urllib3.exceptions.NameResolutionError) for c in causes):
        return _Fail("the FHIR server's host name cannot be resolved", "exception")
    if isinstance(exc, requests.Timeout) or any(
        isinstance(c, TimeoutError | urllib3.exceptions.TimeoutError)
        and not isinstance(c, urllib3.exceptions.NewConnectionError)
        for c in causes
    ):
        return _Fail(f"the FHIR server did not answer within the {budget_s:g} s time budget", "timeout")
    if isinstance(exc, requests.exceptions.SSLError):
        return _Fail("TLS error talking to the FHIR server (certificate not trusted?)", "exception")
    if isinstance(exc, requests.ConnectionError):
        return _Fail("the connection to the FHIR server failed or was dropped", "exception")
    # Only the class name: some requests errors quote header values, i.e. the token.
    return _Fail(f"request failed ({type(exc).__name__})", "exception")


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
            raise _Fail("abandoned: another search already failed", abandoned=True)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _Fail(self._timeout_reason(), "timeout")
        return remaining

    def _timeout_reason(self) -> str:
        return f"the FHIR server did not answer within the {self.settings.fhir_timeout_s:g} s time budget"

    def _check_same_origin(self, url: str, what: str) -> None:
        if _origin(url) != _origin(self.base):
            host = urlsplit(url).hostname or "?"
            raise _Fail(f"{what} to another host ({host}); not following it with the access token")

    def _send(self, url: str) -> requests.Response:
        headers = {"Accept": FHIR_JSON}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(_MAX_REDIRECTS + 1):
            remaining = self._remaining()
            context_token = _DEADLINE.set(self.deadline)
            try:
                # Redirects by hand: requests would follow them to any host.
                response = self.session.get(
                    url, headers=headers, timeout=remaining, stream=True, allow_redirects=False
                )
            except _RetryBudgetExhausted as exc:
                raise _Fail(
                    f"HTTP {exc.status} from the FHIR server; the retry it asks for ({exc.wait_s:g} s) "
                    "does not fit in the remaining time budget",
                    "timeout",
                ) from None
            except requests.RequestException as exc:
                raise _transport_failure(exc, self.settings.fhir_timeout_s) from None
            finally:
                _DEADLINE.reset(context_token)
            if not (response.is_redirect and response.headers.get("Location")):
                return response
            response.close()
            url = urljoin(url, response.headers["Location"])
            self._check_same_origin(url, f"HTTP {response.status_code} redirect")
        raise _Fail("too many redirects")

    def _read_capped(self, response: requests.Response) -> bytes:
        limit = self.settings.fhir_max_response_bytes
        too_big = _Fail(f"the answer is larger than the {limit}-byte limit", "too-long")
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
                    raise _Fail(self._timeout_reason(), "timeout")
        except requests.RequestException as exc:
            raise _transport_failure(exc, self.settings.fhir_timeout_s) from None
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
            raise _Fail(
                reason + (f" (OperationOutcome: {outcome})" if outcome else ""),
                "exception" if status >= 500 or status == 429 else "incomplete",
            )
        if body is None:
            if looks_html:
                raise _Fail("the answer is HTML, not FHIR JSON (is fhirServer the FHIR base URL?)")
            raise _Fail("the answer is empty" if not body_bytes.strip() else "the answer is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise _Fail("the answer is JSON but not a FHIR resource (no resourceType)")
        if body["resourceType"] == "OperationOutcome" and expect != "OperationOutcome":
            raise _Fail(f"the server answered an OperationOutcome: {_outcome_text(body) or 'no details'}")
        if body["resourceType"] != expect:
            raise _Fail(f"the answer is a {body['resourceType'][:60]}, expected a {expect}")
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
                raise _Fail("the server's paging does not end (a next link repeats, or too many pages)")
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
        except _Fail as fail:
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
    failures: list[tuple[str, _Fail]] = []
    for future in done:
        exc = future.exception()
        if isinstance(exc, _Fail):
            failures.append((futures[future], exc))
        elif exc is not None:
            raise exc
    # A search abandoned because another one failed is noise in the message.
    failures = [f for f in failures if not f[1].abandoned] or failures
    if not failures and pending:
        fetcher.abort.set()
        failures = [(futures[f], _Fail(fetcher._timeout_reason(), "timeout")) for f in pending]
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
    Raises FetchFailed (a DataUnavailable, 412) naming the failed searches and why.
    """
    started = time.monotonic()
    base = check_fhir_server(fhir_server, settings)
    _check_token(token)
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
    _check_token(token)
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
