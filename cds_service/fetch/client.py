"""Outbound FHIR REST client: fetch the chart from the EHR's fhirServer when prefetch is missing.

Every search of one hook call runs concurrently inside ONE time budget (`CDS_FHIR_TIMEOUT_S`), so
the call costs the slowest search chain, not the sum; pages a server numbers by offset are fetched
side by side. A required search that fails makes the call a 412 (`FetchFailed`) naming every
failed search and a generic cause; an optional one that the server refuses or that runs out of time
is reported as unavailable and the call goes on without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from cds_service.errors import FetchError
from cds_service.fetch.budget import CallBudget, Workers
from cds_service.fetch.exchange import REFUSALS, Exchange
from cds_service.fetch.policy import check_fhir_server, check_token, next_page_url, under
from cds_service.fetch.session import Fail
from cds_service.settings import Settings

log = logging.getLogger("cds_service.fhir_client")  # the name operators filter on, kept across the move

_MAX_PAGES = 1000
# The page size our own searches ask for (servers cap it at their own maximum).
PAGE_COUNT = 1000
# Threads beyond one per search chain, for pages fetched side by side.
_PAGE_THREADS = 6
# Workers time out on their own at the deadline; this grace lets their precise reason win over
# the generic timeout of the hard stop.
_GRACE_S = 0.25
_OFFSET_PARAMS = ("_getpagesoffset", "_offset")
DEGRADABLE = frozenset(
    {*(f"HTTP {s}" for s in REFUSALS), "refused (OperationOutcome)", "timeout", "rate-limited"}
)


@dataclass(frozen=True)
class SearchReport:
    key: str
    query: str  # may hold the patient id: fine for a developer's console, keep it out of logs
    pages: int
    resources: int
    seconds: float
    outcome: str  # "ok", "not found" (a read answering 404/410), "unavailable: <cause>", or the cause


@dataclass
class FetchReport:
    searches: list[SearchReport]
    seconds: float
    unavailable: dict[str, str] = field(default_factory=dict)  # optional key -> generic cause


class FetchFailed(FetchError):
    """A 412 that also carries the account of what was fetched (for `cds-service evaluate`)."""

    def __init__(self, diagnostics: str, *, issue_code: str, report: FetchReport) -> None:
        super().__init__(diagnostics, issue_code=issue_code)
        self.report = report


class PatientNotFound(FetchFailed):
    """The FHIR server does not know the context patient (its Patient read answered 404/410)."""


def _search_mode(entry: dict[str, Any]) -> Any:
    search = entry.get("search")
    return (search.get("mode") if isinstance(search, dict) else None) or "match"


def _page_plan(page: dict[str, Any], next_url: str, have: int) -> list[str]:
    """The URLs of every remaining page when the server numbers pages by offset and says how many
    results there are (HAPI `_getpagesoffset`, `_offset`): fetched side by side, not one by one."""
    total = page.get("total")
    if type(total) is not int or total <= have:
        return []
    parts = urlsplit(next_url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in params]
    offset_name = next((n for n in _OFFSET_PARAMS if names.count(n) == 1), None)
    if offset_name is None:
        return []
    values = dict(params)
    try:
        offset = int(values[offset_name])
        size = int(values.get("_count") or len(page.get("entry") or []))
    except ValueError:
        return []
    if size <= 0 or offset != have or (total - offset) // size + 1 > _MAX_PAGES:
        return []
    urls = []
    for start in range(offset, total, size):
        query = urlencode([(n, str(start) if n == offset_name else v) for n, v in params])
        urls.append(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")))
    return urls if len(urls) > 1 else []


class _Collector:
    """One search chain: the first page, then every next page, merged into one searchset Bundle."""

    def __init__(self, exchange: Exchange, workers: Workers | None) -> None:
        self.exchange = exchange
        self.workers = workers
        self.entries: list[dict[str, Any]] = []
        self._seen_ids: set[tuple[str, str]] = set()

    def _add(self, page: dict[str, Any]) -> None:
        entries = page.get("entry") or []
        if not isinstance(entries, list):
            raise Fail("not FHIR", detail="Bundle.entry is not a list")
        self.exchange.budget.spend_entries(len(entries))
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                continue
            # Offset paging over a changing result set can repeat an entry on two pages.
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if type(rtype) is str and type(rid) is str:
                if (rtype, rid) in self._seen_ids:
                    continue
                self._seen_ids.add((rtype, rid))
            self.entries.append(entry)

    def next_url(self, bundle: dict[str, Any], current: str) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                url = next_page_url(urljoin(current, str(link["url"])), self.exchange.base)
                if url is None:
                    raise Fail("refused", detail="a next link outside fhirServer's base URL")
                return url
        return None

    def collect(self, first: dict[str, Any] | None, url: str | None) -> tuple[dict[str, Any], int]:
        pages = 0
        seen_urls: set[str] = set()
        if first is not None:
            self._add(first)
        while url:
            if url in seen_urls or pages >= _MAX_PAGES:
                raise Fail(
                    "not FHIR", detail="paging that does not end (a next link repeats, or too many pages)"
                )
            seen_urls.add(url)
            page = self._page(url)
            pages += 1
            first = first or page
            self._add(page)
            url = self.next_url(page, url)
            plan = _page_plan(page, url, len(self.entries)) if url and self.workers else []
            if plan and self.workers is not None:
                futures = [self.workers.submit(self._page, u) for u in plan]
                for future in futures:
                    page = future.result()
                    pages += 1
                    self._add(page)
                seen_urls.update(plan)
                url = self.next_url(page, plan[-1])  # a result set that grew meanwhile: go on from there
        assert first is not None
        merged = {k: v for k, v in first.items() if k not in ("link", "entry", "total")}
        merged["type"] = first.get("type") or "searchset"
        merged["total"] = sum(1 for e in self.entries if _search_mode(e) == "match")
        if self.entries:  # FHIR JSON has no empty arrays
            merged["entry"] = self.entries
        return merged, pages

    def _page(self, url: str) -> dict[str, Any]:
        page = self.exchange.get_resource(url, "Bundle")
        assert page is not None
        return page


def _is_read(query: str) -> bool:
    path = query.split("?", 1)[0].strip("/")
    return "?" not in query and len(path.split("/")) >= 2


def _label(query: str) -> str:
    """The resource type of a query; the only part of it that goes into messages (no patient id)."""
    return query.split("?", 1)[0].strip("/").split("/", 1)[0][:60] or "?"


def with_count(query: str) -> str:
    """Our own searches ask for large pages: one round trip where a server would page at 20."""
    if "?" not in query or any(p.startswith("_count=") for p in query.split("?", 1)[1].split("&")):
        return query
    return f"{query}&_count={PAGE_COUNT}"


Task = Callable[[Exchange, Workers], tuple[dict[str, Any] | None, int]]


def run_tasks(
    exchange: Exchange,
    tasks: dict[str, tuple[str, Task]],
    *,
    required: Collection[str],
    patient_key: str | None = None,
) -> tuple[dict[str, dict[str, Any] | None], FetchReport]:
    """Run every task concurrently within the call's budget; see the module docstring."""
    started = time.monotonic()
    budget = exchange.budget
    reports: dict[str, SearchReport] = {}
    results: dict[str, dict[str, Any] | None] = {}
    fails: dict[str, Fail] = {}
    bugs: list[BaseException] = []
    workers = Workers(budget, len(tasks), _PAGE_THREADS)

    def work(key: str, query: str, task: Task) -> None:
        t0 = time.monotonic()
        try:
            value, pages = task(exchange, workers)
        except Fail as fail:
            fails[key] = fail
            if fail.fatal:
                budget.abort.set()
            reports[key] = SearchReport(key, query, 0, 0, round(time.monotonic() - t0, 3), fail.cause)
            return
        except BaseException as exc:
            bugs.append(exc)  # a bug, not the FHIR server's doing: re-raised in the caller's thread
            budget.abort.set()
            raise
        count = (
            len(value.get("entry") or [])
            if value and value.get("resourceType") == "Bundle"
            else int(bool(value))
        )
        outcome = "ok" if value is not None else "not found"
        reports[key] = SearchReport(key, query, pages, count, round(time.monotonic() - t0, 3), outcome)
        results[key] = value
        if key == patient_key and value is None:
            budget.abort.set()  # nothing else matters for a patient the server does not know

    futures: dict[Future[None], str] = {}
    try:
        for key, (query, task) in tasks.items():
            futures[workers.submit(work, key, query, task)] = key
        pending = set(futures)
        while pending and not budget.abort.is_set():
            left = budget.deadline - time.monotonic() + _GRACE_S
            if left <= 0:
                break
            _, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
    finally:
        workers.close()
    if pending:
        # The budget is spent: wake every thread still reading and let it go.
        budget.tracker.close_all()
        # Woken by their closed sockets, the threads record their own (generic) cause at once.
        wait(pending, timeout=_GRACE_S)
        for future in pending:
            key = futures[future]
            fails.setdefault(key, Fail("timeout", "timeout", detail="not finished within the budget"))
            fails[key].timed_out = True
    if bugs:
        raise bugs[0]
    report = _report(tasks, reports, fails, required, started)
    if patient_key is not None and patient_key in results and results[patient_key] is None:
        raise PatientNotFound(
            "patient not found: the FHIR server does not know the context patient",
            issue_code="not-found",
            report=report,
        )
    _raise_for_failures(tasks, fails, report)
    return results, report


def _report(
    tasks: dict[str, tuple[str, Task]],
    reports: dict[str, SearchReport],
    fails: dict[str, Fail],
    required: Collection[str],
    started: float,
) -> FetchReport:
    unavailable = {  # in the service's order of searches, not the order they failed in
        key: "timeout" if fail.timed_out else fail.cause
        for key in tasks
        if (fail := fails.get(key)) is not None
        and key not in required
        and (fail.cause in DEGRADABLE or fail.timed_out)
        and not fail.fatal
    }
    searches = []
    for key, (query, _) in tasks.items():
        r = reports.get(key) or SearchReport(
            key, query, 0, 0, round(time.monotonic() - started, 3), "timeout"
        )
        if key in unavailable:
            r = SearchReport(key, query, r.pages, 0, r.seconds, f"unavailable: {unavailable[key]}")
        searches.append(r)
    for key, fail in fails.items():
        # For the operator: the key, the resource type, a generic cause and our own classification.
        log.warning(
            "FHIR %s %r (%s): %s%s",
            "read" if _is_read(tasks[key][0]) else "search",
            key,
            _label(tasks[key][0]),
            fail.cause,
            f" [{fail.detail}]" if fail.detail else "",
        )
    for r in searches:
        log.info(
            "FHIR %r (%s): %d page(s), %d resource(s), %.3f s, %s",
            r.key,
            _label(r.query),
            r.pages,
            r.resources,
            r.seconds,
            r.outcome,
        )
    return FetchReport(searches, round(time.monotonic() - started, 3), unavailable)


def _raise_for_failures(
    tasks: dict[str, tuple[str, Task]],
    fails: dict[str, Fail],
    report: FetchReport,
) -> None:
    fatal = [k for k in tasks if k in fails and fails[k].fatal]
    failed = fatal or [k for k in tasks if k in fails and k not in report.unavailable]
    if not failed:
        return
    parts = [
        f"{'read' if _is_read(tasks[key][0]) else 'search'} '{key}' ({_label(tasks[key][0])}): {fails[key].cause}"
        for key in failed  # in the service's own order of searches: the same message every time
    ]
    # Built only from our own keys, resource types and generic causes: nothing to redact.
    message = "Could not read the FHIR data the service needs — " + "; ".join(parts)
    raise FetchFailed(message, issue_code=fails[failed[0]].code, report=report)


def _exchange(fhir_server: str, token: str | None, budget: CallBudget, issuer: str | None) -> Exchange:
    base = check_fhir_server(fhir_server, budget.settings, issuer)
    check_token(token)
    return Exchange(base, token, budget)


def search_task(query: str) -> Task:
    def run(exchange: Exchange, workers: Workers) -> tuple[dict[str, Any] | None, int]:
        url = urljoin(exchange.base + "/", query.lstrip("/"))
        if not under(url, exchange.base):
            raise Fail("refused", detail="a query outside fhirServer's base URL")
        if _is_read(query):
            return exchange.get_resource(url, _label(query), missing_ok=True), 1
        return _Collector(exchange, workers).collect(None, with_count(url))

    return run


def follow_task(bundle: dict[str, Any]) -> Task:
    def run(exchange: Exchange, workers: Workers) -> tuple[dict[str, Any] | None, int]:
        collector = _Collector(exchange, workers)
        merged, pages = collector.collect(bundle, collector.next_url(bundle, exchange.base + "/"))
        return merged, pages + 1

    return run


def fetch_queries(
    fhir_server: str,
    token: str | None,
    queries: dict[str, str],
    budget: CallBudget | Settings,
    *,
    follow: dict[str, dict[str, Any]] | None = None,
    required: Collection[str] | None = None,
    patient_key: str | None = None,
    issuer: str | None = None,
) -> tuple[dict[str, dict[str, Any] | None], FetchReport]:
    """Run the relative FHIR queries (and complete the first-page Bundles in `follow`) concurrently
    within the call's budget.

    Searches come back as one merged searchset Bundle each (every page followed); reads as the
    resource, or None when the server answers 404/410. `required` names the keys whose failure is
    a 412 (default: all); the others, when refused or out of time, are left out and listed in
    `FetchReport.unavailable`. A None read of `patient_key` raises PatientNotFound.
    """
    if isinstance(budget, Settings):  # a fetch of its own (tests, tools): its own budget, closed after
        with CallBudget(budget) as own:
            return fetch_queries(
                fhir_server,
                token,
                queries,
                own,
                follow=follow,
                required=required,
                patient_key=patient_key,
                issuer=issuer,
            )
    follow = {k: b for k, b in (follow or {}).items() if has_next_link(b)}
    if not queries and not follow:
        return {}, FetchReport([], 0.0)
    exchange = _exchange(fhir_server, token, budget, issuer)
    tasks: dict[str, tuple[str, Task]] = {key: (query, search_task(query)) for key, query in queries.items()}
    for key, bundle in follow.items():
        tasks[key] = (f"{_bundle_type(bundle)}?(next pages)", follow_task(bundle))
    return run_tasks(
        exchange, tasks, required=tasks.keys() if required is None else required, patient_key=patient_key
    )


def _bundle_type(bundle: dict[str, Any]) -> str:
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            return str(resource["resourceType"])
    return "Bundle"


def has_next_link(bundle: dict[str, Any]) -> bool:
    """True when a Bundle says more pages follow (a `link` with relation `next`)."""
    links = bundle.get("link") or []
    return isinstance(links, list) and any(
        isinstance(link, dict) and link.get("relation") == "next" for link in links
    )


def follow_next_links(
    bundle: dict[str, Any],
    fhir_server: str,
    token: str | None,
    budget: CallBudget | Settings,
    *,
    key: str = "prefetch",
) -> dict[str, Any]:
    """Complete a prefetch Bundle the EHR sent with only its first page; the merged Bundle.

    A Bundle without a next link comes back unchanged (no HTTP call, fhir_server not needed).
    """
    if not has_next_link(bundle):
        return bundle
    results, _ = fetch_queries(fhir_server, token, {}, budget, follow={key: bundle})
    merged = results[key]
    assert merged is not None
    return merged
