"""Prometheus metrics of the service, served at GET /metrics.

Under `cds-service serve` (several gunicorn workers) prometheus_client runs in multiprocess mode:
each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR and /metrics adds them up,
whichever worker answers (set up by observability.prepare_metrics_dir before this is imported).
Labels take only values from closed sets (known service ids, models, recommendations, outcomes,
status codes) so nobody can grow the series count by sending odd requests.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from cds_service.pipeline import Outcome
from cds_service.store.database import CardRecord, FeedbackResult

log = logging.getLogger("cds_service.metrics")  # the name operators filter on, kept across the move
P = ParamSpec("P")

# Hook calls take milliseconds with prefetch and up to the FHIR time budget without.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("cds_http_requests_total", "HTTP requests answered", ["service", "endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "cds_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["service", "endpoint"],
    buckets=_SECONDS,
)
FHIR_FETCH_SECONDS = Histogram(
    "cds_fhir_fetch_duration_seconds",
    "Time spent fetching FHIR data from the EHR's FHIR server for one hook call",
    ["service"],
    buckets=_SECONDS,
)
CARDS = Counter("cds_cards_total", "Cards returned", ["service", "model", "recommendation"])
FEEDBACK = Counter("cds_feedback_total", "Feedback entries stored", ["service", "outcome"])
FEEDBACK_DUPLICATES = Counter(
    "cds_feedback_duplicates_total", "Feedback entries received again (not stored twice)", ["service"]
)
STORE_ERRORS = Counter("cds_store_errors_total", "Store writes that failed", ["operation"])
# Summed over the live workers. Records normally sit in the spool for a fraction of a second; a value
# that stays above zero means the database is not taking them (alert on its minimum over a minute).
AUDIT_SPOOL_RECORDS = Gauge(
    "cds_audit_spool_records",
    "Audit records and feedback posts in the local spool, not yet in the database",
    multiprocess_mode="livesum",
)
# The spool folder's size (every worker sees the same folder: the largest report, not a sum), and
# its cap: at the cap, hook calls and feedback are answered 503 (`cds_store_errors_total{operation=
# "spool_full"}` counts them). Alert well before: `cds_audit_spool_bytes / cds_audit_spool_max_bytes > 0.5`.
AUDIT_SPOOL_BYTES = Gauge(
    "cds_audit_spool_bytes",
    "Bytes of audit records in the local spool, not yet in the database",
    multiprocess_mode="livemax",
)
AUDIT_SPOOL_MAX_BYTES = Gauge(
    "cds_audit_spool_max_bytes", "The spool's cap (CDS_AUDIT_SPOOL_MAX_BYTES)", multiprocess_mode="livemax"
)
SHED = Counter(
    "cds_calls_shed_total", "Hook calls answered 503: the worker's FHIR-bound calls were at their limit"
)


def _never_raises(observe: Callable[P, None]) -> Callable[P, None]:
    """Counting must never cost an answer (e.g. the multiprocess folder removed under us)."""

    @functools.wraps(observe)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            observe(*args, **kwargs)
        except Exception as exc:
            log.warning("metrics not updated (%s): %s: %s", observe.__name__, type(exc).__name__, exc)

    return guarded


# The labelled series of each (service, endpoint, status): `labels()` takes a lock and builds its key
# on every call, and this runs on every request. A handful of combinations exist.
_request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}


@_never_raises
def observe_request(service: str, endpoint: str, status: int, seconds: float) -> None:
    key = (service, endpoint, status)
    series = _request_series.get(key)
    if series is None:
        series = _request_series[key] = (
            REQUESTS.labels(service=service, endpoint=endpoint, status=str(status)),
            REQUEST_SECONDS.labels(service=service, endpoint=endpoint),
        )
    series[0].inc()
    series[1].observe(seconds)


@_never_raises
def count_shed() -> None:
    SHED.inc()


@_never_raises
def store_error(operation: str, count: int = 1) -> None:
    STORE_ERRORS.labels(operation=operation).inc(count)


@_never_raises
def audit_spool_records(count: int) -> None:
    AUDIT_SPOOL_RECORDS.set(count)


@_never_raises
def audit_spool_bytes(size: int, cap: int | None) -> None:
    AUDIT_SPOOL_BYTES.set(size)
    if cap is not None:
        AUDIT_SPOOL_MAX_BYTES.set(cap)


_card_series: dict[tuple[str, str, str], Any] = {}


@_never_raises
def observe_answer(service_id: str, outcome: Outcome, cards: Iterable[CardRecord]) -> None:
    for card in cards:
        key = (service_id, card.model or "none", card.recommendation or "none")
        series = _card_series.get(key)
        if series is None:  # a few dozen combinations: models × recommendations
            series = _card_series[key] = CARDS.labels(service=key[0], model=key[1], recommendation=key[2])
        series.inc()
    report = outcome.source.report
    if report is not None:
        FHIR_FETCH_SECONDS.labels(service=service_id).observe(report.seconds)


@_never_raises
def observe_feedback(service_id: str, result: FeedbackResult) -> None:
    for outcome in result.stored_outcomes:
        FEEDBACK.labels(service=service_id, outcome=outcome).inc()
    if result.duplicates:
        FEEDBACK_DUPLICATES.labels(service=service_id).inc(result.duplicates)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric, summed over all worker processes when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """gunicorn child_exit: drop the dead worker's live gauges (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
