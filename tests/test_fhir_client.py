"""The outbound FHIR client against a real HTTP server (pytest-httpserver)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from cds_service.errors import FetchError, PrefetchInvalid
from cds_service.fetch.client import (
    FetchFailed,
    check_fhir_server,
    fetch_queries,
    follow_next_links,
)
from cds_service.settings import Settings

TOKEN = "s3cr3t-t0ken.abc"
FHIR_JSON = "application/fhir+json"


def settings(**overrides: object) -> Settings:
    # A roomy budget: tests of running out of time set their own; on a loaded 2-core machine a 2 s
    # budget made a plain two-search fetch time out now and then.
    return Settings(**{"fhir_timeout_s": 10.0, **overrides})


def bundle(resources: list[dict], next_url: str | None = None) -> dict:
    out: dict = {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "self", "url": "x"}]}
    if next_url:
        out["link"].append({"relation": "next", "url": next_url})
    if resources:
        out["entry"] = [{"resource": r} for r in resources]
    return out


def condition(i: int) -> dict:
    return {"resourceType": "Condition", "id": f"c{i}", "subject": {"reference": "Patient/p1"}}


def fhir_response(body: object, status: int = 200, **headers: str) -> Response:
    return Response(json.dumps(body), status=status, content_type=FHIR_JSON, headers=headers)


@pytest.fixture
def base(fhir: HTTPServer) -> str:
    return fhir.url_for("/fhir")


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Lets a hanging handler go once the test is over, so no server thread lingers."""
    event = threading.Event()
    yield event
    event.set()


def fetch(base: str, queries: dict[str, str], **kw: object) -> tuple[dict, object]:
    return fetch_queries(base, TOKEN, queries, kw.pop("cfg", None) or settings(), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- happy paths


def test_search_follows_paging_and_merges_pages(fhir: HTTPServer, base: str) -> None:
    def pages(request: Request) -> Response:
        page = int(request.args.get("page", "1"))
        nxt = fhir.url_for("/fhir/Condition") + f"?patient=p1&page={page + 1}" if page < 3 else None
        return fhir_response(bundle([condition(2 * page), condition(2 * page + 1)], nxt))

    fhir.expect_request("/fhir/Condition").respond_with_handler(pages)
    results, report = fetch(base, {"conditions": "Condition?patient=p1"})

    merged = results["conditions"]
    assert merged["resourceType"] == "Bundle" and merged["type"] == "searchset"
    assert [e["resource"]["id"] for e in merged["entry"]] == ["c2", "c3", "c4", "c5", "c6", "c7"]
    assert merged["total"] == 6 and "link" not in merged
    assert report.searches[0].pages == 3 and report.searches[0].resources == 6
    assert report.searches[0].outcome == "ok"


def test_relative_next_link_and_repeated_entries(fhir: HTTPServer, base: str) -> None:
    def pages(request: Request) -> Response:
        if request.args.get("page") == "2":
            return fhir_response(bundle([condition(1), condition(2)]))
        return fhir_response(bundle([condition(1)], "Condition?patient=p1&page=2"))

    fhir.expect_request("/fhir/Condition").respond_with_handler(pages)
    results, _ = fetch(base, {"conditions": "Condition?patient=p1"})
    assert [e["resource"]["id"] for e in results["conditions"]["entry"]] == ["c1", "c2"]


def test_empty_search_has_total_zero_and_no_entry(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Procedure").respond_with_json(bundle([]))
    results, _ = fetch(base, {"procedures": "Procedure?patient=p1"})
    assert results["procedures"]["total"] == 0 and "entry" not in results["procedures"]


def test_searches_run_concurrently(fhir: HTTPServer, base: str) -> None:
    def slow(request: Request) -> Response:
        time.sleep(0.5)
        return fhir_response(bundle([condition(1)]))

    for path in ("/fhir/Condition", "/fhir/Observation", "/fhir/Procedure"):
        fhir.expect_request(path).respond_with_handler(slow)
    t0 = time.monotonic()
    results, report = fetch(
        base, {"a": "Condition?patient=p1", "b": "Observation?patient=p1", "c": "Procedure?patient=p1"}
    )
    elapsed = time.monotonic() - t0
    assert set(results) == {"a", "b", "c"}
    assert elapsed < 1.0, f"searches ran one after the other ({elapsed:.2f} s)"
    assert all(s.seconds >= 0.5 for s in report.searches)


def test_read_returns_resource_and_404_is_none(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
    fhir.expect_request("/fhir/Patient/gone").respond_with_response(
        fhir_response({"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}]}, 404)
    )
    results, report = fetch(base, {"patient": "Patient/p1", "other": "Patient/gone"})
    assert results == {"patient": {"resourceType": "Patient", "id": "p1"}, "other": None}
    assert [s.outcome for s in report.searches] == ["ok", "not found"]


def test_bearer_token_and_accept_header_are_sent(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request(
        "/fhir/Patient/p1", headers={"Authorization": f"Bearer {TOKEN}", "Accept": FHIR_JSON}
    ).respond_with_json({"resourceType": "Patient", "id": "p1"})
    results, _ = fetch(base, {"patient": "Patient/p1"})
    assert results["patient"] is not None
    fhir.check_assertions()


def test_no_token_sends_no_authorization(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
    fetch_queries(base, None, {"patient": "Patient/p1"}, settings())
    assert "Authorization" not in fhir.log[0][0].headers


def test_malformed_token_is_a_bad_request(base: str) -> None:
    with pytest.raises(PrefetchInvalid) as info:
        fetch_queries(base, "abc\r\nX-Evil: 1", {"patient": "Patient/p1"}, settings())
    assert "abc" not in info.value.diagnostics


def test_no_queries_makes_no_call(fhir: HTTPServer, base: str) -> None:
    assert fetch(base, {})[0] == {}
    assert fhir.log == []


# --------------------------------------------------------------------------- retries and budget


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_status_is_retried(fhir: HTTPServer, base: str, status: int) -> None:
    answers = iter([Response("busy", status=status), fhir_response(bundle([condition(1)]))])
    fhir.expect_request("/fhir/Condition").respond_with_handler(lambda request: next(answers))
    results, _ = fetch(base, {"conditions": "Condition?patient=p1"})
    assert results["conditions"]["total"] == 1 and len(fhir.log) == 2


def test_retry_after_is_honoured_then_success(fhir: HTTPServer, base: str) -> None:
    answers = iter(
        [Response("busy", status=503, headers={"Retry-After": "1"}), fhir_response(bundle([condition(1)]))]
    )
    fhir.expect_request("/fhir/Condition").respond_with_handler(lambda request: next(answers))
    t0 = time.monotonic()
    results, _ = fetch(base, {"conditions": "Condition?patient=p1"}, cfg=settings(fhir_timeout_s=3))
    assert time.monotonic() - t0 >= 1.0
    assert results["conditions"]["total"] == 1


def test_retry_after_beyond_the_budget_fails_fast(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Condition").respond_with_response(
        Response("busy", status=503, headers={"Retry-After": "30"})
    )
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(base, {"conditions": "Condition?patient=p1"})
    assert time.monotonic() - t0 < 0.5
    # Service contract §2: a wait past the budget fails the search as rate-limited.
    assert "'conditions' (Condition): rate-limited" in info.value.diagnostics


def test_persistent_503_is_reported_after_retries(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Condition").respond_with_response(Response("down", status=503))
    with pytest.raises(FetchError) as info:
        fetch(base, {"conditions": "Condition?patient=p1"})
    assert "HTTP 503" in info.value.diagnostics and len(fhir.log) == 4


def test_hanging_server_fails_within_the_budget(
    fhir: HTTPServer, base: str, release: threading.Event
) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})

    def hang(request: Request) -> Response:
        release.wait(5)
        return fhir_response(bundle([]))

    fhir.expect_request("/fhir/Observation").respond_with_handler(hang)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(
            base,
            {"patient": "Patient/p1", "labs": "Observation?patient=p1"},
            cfg=settings(fhir_timeout_s=0.5),
        )
    assert time.monotonic() - t0 < 0.5 + 0.4
    # A peer that never answers reads like a closed port: the EHR cannot probe ports through us.
    assert info.value.status == 412 and "connection failed" in info.value.diagnostics
    assert "'labs'" in info.value.diagnostics and "'patient'" not in info.value.diagnostics


def test_budget_is_shared_across_pages(fhir: HTTPServer, base: str) -> None:
    def slow_pages(request: Request) -> Response:
        time.sleep(0.2)
        return fhir_response(bundle([condition(1)], fhir.url_for("/fhir/Condition") + "?again=1"))

    fhir.expect_request("/fhir/Condition").respond_with_handler(slow_pages)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(base, {"conditions": "Condition?patient=p1"}, cfg=settings(fhir_timeout_s=0.5))
    # The loop guard or the budget ends it; either way well before a per-page timeout would.
    assert time.monotonic() - t0 < 0.9
    assert "'conditions'" in info.value.diagnostics


# --------------------------------------------------------------------------- each 412 cause


def _html(request: Request) -> Response:
    return Response("<html><body>Login</body></html>", content_type="text/html")


FAILURES: list[tuple[str, Callable[[Request], Response], str]] = [
    (
        "401",
        lambda r: fhir_response(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"code": "login", "diagnostics": f"token {TOKEN} expired"}],
            },
            401,
        ),
        "HTTP 401",
    ),
    ("403", lambda r: Response("no", status=403, headers={"X-Why": "x"}), "HTTP 403"),
    ("404 search", lambda r: Response("", status=404), "HTTP 404"),
    ("500", lambda r: Response("oops", status=500), "HTTP 500"),
    ("html", _html, "not FHIR"),
    ("garbage", lambda r: Response(b"\x00\xff\xfe garbage", content_type=FHIR_JSON), "not FHIR"),
    ("empty", lambda r: Response(b"", content_type=FHIR_JSON), "not FHIR"),
    ("json not fhir", lambda r: fhir_response({"hello": "world"}), "not FHIR"),
    ("json list", lambda r: fhir_response([1, 2]), "not FHIR"),
    ("wrong type", lambda r: fhir_response({"resourceType": "Patient", "id": "x"}), "not FHIR"),
    (
        "operation outcome",
        lambda r: fhir_response(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": "search failed"}],
            }
        ),
        "refused (OperationOutcome)",
    ),
]


@pytest.mark.parametrize(("name", "handler", "expected"), FAILURES, ids=[f[0] for f in FAILURES])
def test_each_failure_is_a_clear_412(
    fhir: HTTPServer, base: str, name: str, handler: Callable[[Request], Response], expected: str
) -> None:
    fhir.expect_request("/fhir/Observation").respond_with_handler(handler)
    with pytest.raises(FetchError) as info:
        fetch(base, {"cea": "Observation?patient=p1&code=http://loinc.org|2039-6"})
    err = info.value
    assert err.status == 412
    assert "search 'cea' (Observation)" in err.diagnostics and expected in err.diagnostics
    assert TOKEN not in err.diagnostics
    assert "p1" not in err.diagnostics  # the query (patient id) stays out of the message
    # Generic causes only: nothing the server wrote is quoted (reason phrase, OperationOutcome text).
    for upstream in ("expired", "search failed", "Patient", "Login", "FORBIDDEN", "Forbidden", "garbage"):
        assert upstream not in err.diagnostics
    assert isinstance(err, FetchFailed) and err.report.searches[0].outcome != "ok"


def test_one_failure_names_only_the_failed_search(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
    fhir.expect_request("/fhir/Condition").respond_with_response(Response("no", status=403))
    with pytest.raises(FetchError) as info:
        fetch(base, {"patient": "Patient/p1", "conditions": "Condition?patient=p1"})
    assert "'conditions'" in info.value.diagnostics and "'patient'" not in info.value.diagnostics


def test_read_answering_html_404_is_not_taken_for_no_patient(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_response(
        Response("<html>Not Found</html>", status=404, content_type="text/html")
    )
    with pytest.raises(FetchError, match="read 'patient'"):
        fetch(base, {"patient": "Patient/p1"})


def test_connection_refused(fhir: HTTPServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as info:
        fetch(f"http://127.0.0.1:{port}/fhir", {"patient": "Patient/p1"})
    assert "'patient'" in info.value.diagnostics and "connection failed" in info.value.diagnostics
    assert info.value.status == 412


@pytest.mark.parametrize("url", [None, "", "  "])
def test_no_fhir_server(url: str | None) -> None:
    with pytest.raises(FetchError, match="no fhirServer"):
        fetch_queries(url, TOKEN, {"patient": "Patient/p1"}, settings())  # type: ignore[arg-type]


def test_response_size_is_capped(fhir: HTTPServer, base: str) -> None:
    big = bundle([condition(i) for i in range(100)])
    fhir.expect_request("/fhir/Condition").respond_with_json(big)
    # Streamed without Content-Length: the cap must count bytes as they come.
    fhir.expect_request("/fhir/Observation").respond_with_handler(
        lambda r: Response(iter([json.dumps(big).encode()] * 3), content_type=FHIR_JSON)
    )
    for key, query in (("conditions", "Condition?patient=p1"), ("labs", "Observation?patient=p1")):
        with pytest.raises(FetchError) as info:
            fetch(base, {key: query}, cfg=settings(fhir_max_response_bytes=1000))
        assert f"'{key}'" in info.value.diagnostics and "too large" in info.value.diagnostics


def test_cross_host_redirect_is_not_followed(fhir: HTTPServer, base: str) -> None:
    other = HTTPServer(host="127.0.0.1")
    other.start()
    try:
        other.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
        fhir.expect_request("/fhir/Patient/p1").respond_with_response(
            Response("", status=302, headers={"Location": other.url_for("/fhir/Patient/p1")})
        )
        with pytest.raises(FetchError) as info:
            fetch(base, {"patient": "Patient/p1"})
        assert "refused" in info.value.diagnostics and other.log == []
    finally:
        other.stop()


def test_same_host_redirect_is_followed(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Patient/p1").respond_with_response(
        Response("", status=307, headers={"Location": "/fhir/Patient/p1-moved"})
    )
    fhir.expect_request(
        "/fhir/Patient/p1-moved", headers={"Authorization": f"Bearer {TOKEN}"}
    ).respond_with_json({"resourceType": "Patient", "id": "p1-moved"})
    assert fetch(base, {"patient": "Patient/p1"})[0]["patient"]["id"] == "p1-moved"


def test_next_link_off_the_base_path_is_not_followed(fhir: HTTPServer, base: str) -> None:
    for link in (
        "https://elsewhere.example/other/Condition?page=2",
        "/admin/Condition?page=2",
        "/fhir/../x?p=2",
    ):
        fhir.clear()
        fhir.expect_request("/fhir/Condition").respond_with_json(bundle([condition(1)], link))
        with pytest.raises(FetchError, match="refused"):
            fetch(base, {"conditions": "Condition?patient=p1"})
        assert len(fhir.log) == 1, link


def test_next_link_on_a_host_alias_is_fetched_from_the_fhir_server_origin(
    fhir: HTTPServer, base: str
) -> None:
    """A server that calls itself localhost (or sits behind a port mapping) while called as 127.0.0.1."""
    fhir.expect_request("/fhir/Condition", query_string="page=2").respond_with_json(bundle([condition(2)]))
    fhir.expect_request("/fhir/Condition").respond_with_json(
        bundle([condition(1)], "https://localhost:8443/fhir/Condition?page=2")
    )
    results, _ = fetch(base, {"conditions": "Condition?patient=p1"})
    assert [e["resource"]["id"] for e in results["conditions"]["entry"]] == ["c1", "c2"]
    page2 = fhir.log[1][0]
    assert page2.args.get("page") == "2" and page2.headers["Authorization"] == f"Bearer {TOKEN}"


def test_token_is_never_logged(fhir: HTTPServer, base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fhir.expect_request("/fhir/Patient/p1").respond_with_json({"resourceType": "Patient", "id": "p1"})
    fhir.expect_request("/fhir/Condition").respond_with_response(
        fhir_response(
            {"resourceType": "OperationOutcome", "issue": [{"code": "login", "diagnostics": f"bad {TOKEN}"}]},
            401,
        )
    )
    fetch(base, {"patient": "Patient/p1"})
    with pytest.raises(FetchError):
        fetch(base, {"conditions": "Condition?patient=p1"})
    assert caplog.records, "expected the client to log its searches"
    assert TOKEN not in caplog.text


# --------------------------------------------------------------------------- fhirServer checks


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://fhir.example.org/r4/", "https://fhir.example.org/r4"),
        ("HTTPS://FHIR.example.org/R4", "https://fhir.example.org/R4"),
        ("http://127.0.0.1:8080/fhir", "http://127.0.0.1:8080/fhir"),
        ("http://localhost/fhir/", "http://localhost/fhir"),
        ("http://[::1]:9000/fhir", "http://[::1]:9000/fhir"),
    ],
)
def test_accepted_fhir_servers(url: str, expected: str) -> None:
    assert check_fhir_server(url, settings()) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://fhir.example.org/r4", "plain http"),
        ("ftp://fhir.example.org/r4", "not an http"),
        ("not a url", "not an http"),
        ("https://user:pw@fhir.example.org/r4", "credentials"),
        ("https://fhir.example.org/r4?x=1", "without query"),
    ],
)
def test_rejected_fhir_servers(url: str, message: str) -> None:
    with pytest.raises(FetchError, match=message) as info:
        check_fhir_server(url, settings())
    assert info.value.status == 412 and "pw" not in info.value.diagnostics


def test_insecure_fhir_server_can_be_allowed() -> None:
    assert check_fhir_server("http://fhir.example.org/r4", settings(allow_insecure_fhir=True))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://fhir.example.org/r4", True),
        ("https://fhir.example.org/r4/tenant-1/", True),
        ("https://fhir.example.org:443/r4", True),
        ("https://fhir.example.org/r4x", False),
        ("https://fhir.example.org.evil.test/r4", False),
        ("https://fhir.example.org:8443/r4", False),
        ("https://other.example.org/r4", False),
    ],
)
def test_allowlist(url: str, ok: bool) -> None:
    cfg = settings(fhir_server_allowlist=["https://fhir.example.org/r4/", "https://sandbox.test"])
    if ok:
        assert check_fhir_server(url, cfg)
    else:
        with pytest.raises(FetchError, match="ALLOWLIST"):
            check_fhir_server(url, cfg)


def test_fetch_checks_the_fhir_server_too() -> None:
    with pytest.raises(FetchError, match="plain http"):
        fetch_queries("http://fhir.example.org/r4", TOKEN, {"p": "Patient/1"}, settings())


# --------------------------------------------------------------------------- follow_next_links


def test_follow_next_links_completes_a_prefetch_bundle(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request(
        "/fhir/Condition", query_string="page=2", headers={"Authorization": f"Bearer {TOKEN}"}
    ).respond_with_json(bundle([condition(2)], fhir.url_for("/fhir/Condition") + "?page=3"))
    fhir.expect_request("/fhir/Condition", query_string="page=3").respond_with_json(bundle([condition(3)]))
    first = bundle([condition(1)], fhir.url_for("/fhir/Condition") + "?page=2")
    merged = follow_next_links(first, base, TOKEN, settings(), key="conditions")
    assert [e["resource"]["id"] for e in merged["entry"]] == ["c1", "c2", "c3"]
    assert merged["total"] == 3 and "link" not in merged


def test_follow_next_links_without_next_is_a_no_op() -> None:
    first = bundle([condition(1)])
    assert follow_next_links(first, "", TOKEN, settings()) is first


def test_follow_next_links_failure_names_the_key(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Condition").respond_with_response(Response("", status=401))
    first = bundle([condition(1)], fhir.url_for("/fhir/Condition") + "?page=2")
    with pytest.raises(FetchError, match=r"'conditions'.*HTTP 401"):
        follow_next_links(first, base, TOKEN, settings(), key="conditions")


# --------------------------------------------------------------------------- paging and pacing


def test_offset_pages_are_fetched_side_by_side(fhir: HTTPServer, base: str) -> None:
    """A server that pages at 20 whatever _count says, numbering pages by offset (HAPI style)."""
    total, size = 200, 20

    def pages(request: Request) -> Response:
        time.sleep(0.1)
        offset = int(request.args.get("_getpagesoffset", "0"))
        nxt = None
        if offset + size < total:
            nxt = fhir.url_for("/fhir") + f"?_getpages=abc&_getpagesoffset={offset + size}&_count={size}"
        page = bundle([condition(i) for i in range(offset, min(total, offset + size))], nxt)
        page["total"] = total
        return fhir_response(page)

    fhir.expect_request("/fhir/Condition").respond_with_handler(pages)
    fhir.expect_request("/fhir").respond_with_handler(pages)
    t0 = time.monotonic()
    results, report = fetch(base, {"conditions": "Condition?patient=p1"}, cfg=settings(fhir_timeout_s=3))
    elapsed = time.monotonic() - t0
    assert [e["resource"]["id"] for e in results["conditions"]["entry"]] == [f"c{i}" for i in range(total)]
    assert report.searches[0].pages == 10
    assert elapsed < 0.6, f"10 pages of 0.1 s took {elapsed:.2f} s: fetched one after the other"
    assert int(fhir.log[0][0].args["_count"]) >= 200


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Reset": "1"},
        {"RateLimit": '"default";r=0;t=1'},
        {"RateLimit": "limit=10, remaining=0, reset=1"},
    ],
)
def test_429_waits_for_the_ratelimit_reset(fhir: HTTPServer, base: str, headers: dict[str, str]) -> None:
    answers = iter(
        [Response("slow down", status=429, headers=headers), fhir_response(bundle([condition(1)]))]
    )
    fhir.expect_request("/fhir/Condition").respond_with_handler(lambda request: next(answers))
    t0 = time.monotonic()
    results, _ = fetch(base, {"conditions": "Condition?patient=p1"}, cfg=settings(fhir_timeout_s=3))
    assert results["conditions"]["total"] == 1 and time.monotonic() - t0 >= 0.95


def test_optional_search_refused_is_unavailable_not_a_failure(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Condition").respond_with_json(bundle([condition(1)]))
    fhir.expect_request("/fhir/BodyStructure").respond_with_response(Response("no", status=403))
    results, report = fetch(
        base,
        {"conditions": "Condition?patient=p1", "bodystructures": "BodyStructure?patient=p1"},
        required=("conditions",),
    )
    assert "bodystructures" not in results and report.unavailable == {"bodystructures": "HTTP 403"}
    assert [s.outcome for s in report.searches] == ["ok", "unavailable: HTTP 403"]


def test_optional_search_that_is_not_fhir_still_fails_the_call(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/BodyStructure").respond_with_response(Response("oops", status=500))
    with pytest.raises(FetchError, match=r"'bodystructures' \(BodyStructure\): HTTP 500"):
        fetch(base, {"bodystructures": "BodyStructure?patient=p1"}, required=())


# --------------------------------------------------------------------------- allowlist per issuer


def test_allowlist_per_trusted_issuer() -> None:
    cfg = Settings(
        fhir_server_allowlist='{"https://ehr-a.example/iss": ["https://a.example/fhir"], "*": "https://shared.example/r4"}'
    )
    assert check_fhir_server("https://a.example/fhir", cfg, "https://ehr-a.example/iss")
    assert check_fhir_server("https://shared.example/r4/t1", cfg, "https://ehr-b.example/iss")
    with pytest.raises(FetchError, match="ALLOWLIST"):
        check_fhir_server("https://a.example/fhir", cfg, "https://ehr-b.example/iss")
    # Auth off (no issuer): any server listed for any issuer.
    assert check_fhir_server("https://a.example/fhir", cfg, None)
    with pytest.raises(FetchError, match="ALLOWLIST"):
        check_fhir_server("https://other.example/fhir", cfg, None)


def test_optional_search_out_of_time_is_unavailable(
    fhir: HTTPServer, base: str, release: threading.Event
) -> None:
    def hang(request: Request) -> Response:
        release.wait(5)
        return fhir_response(bundle([]))

    fhir.expect_request("/fhir/Condition").respond_with_json(bundle([condition(1)]))
    fhir.expect_request("/fhir/BodyStructure").respond_with_handler(hang)
    t0 = time.monotonic()
    results, report = fetch(
        base,
        {"conditions": "Condition?patient=p1", "bodystructures": "BodyStructure?patient=p1"},
        cfg=settings(fhir_timeout_s=0.5),
        required=("conditions",),
    )
    assert time.monotonic() - t0 < 1.2
    assert results["conditions"]["total"] == 1 and report.unavailable == {"bodystructures": "timeout"}


def test_a_short_token_does_not_garble_the_message(fhir: HTTPServer, base: str) -> None:
    fhir.expect_request("/fhir/Condition").respond_with_response(Response("no", status=403))
    with pytest.raises(FetchError) as info:
        fetch_queries(base, "t", {"conditions": "Condition?patient=p1"}, settings())
    assert "search 'conditions' (Condition): HTTP 403" in info.value.diagnostics
