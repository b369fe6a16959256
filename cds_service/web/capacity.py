"""Liveness under saturation: each worker keeps a thread free of calls that wait on FHIR servers.

A gthread worker answers one request per thread. A call without a complete prefetch waits on the
EHR's FHIR server for up to `CDS_FHIR_TIMEOUT_S`; enough such calls against a hanging server would
take every thread, and `/healthz`, the metrics scrape and fully prefetched calls would queue behind
them (the container's health check gives up after 3 s and restarts a service that was only
waiting). So a worker admits at most `CDS_MAX_FHIR_CALLS` FHIR-bound calls at once (`serve`: its
threads less one) and answers the next one 503 with `Retry-After` at once — a transient answer an
EHR may retry, while the service stays responsive for everything else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cds_service.errors import Overloaded
from cds_service.hooks.catalogue import Service
from cds_service.telemetry import metrics

RETRY_AFTER_S = 2


def fhir_bound(body: Any, service: Service) -> bool:
    """Whether answering this request may read from its FHIR server.

    A cheap look at the raw body, before validation: a request with a `fhirServer` whose prefetch
    lacks a key, holds an OperationOutcome for one (the EHR could not prefetch it) or a Bundle with
    a next page. Anything else is answered from what was sent, in milliseconds.
    """
    if not isinstance(body, Mapping) or not body.get("fhirServer"):
        return False
    prefetch = body.get("prefetch")
    if not isinstance(prefetch, Mapping):
        return True
    for key in service.prefetch:
        value = prefetch.get(key, ...)
        if value is ...:
            return True
        if isinstance(value, Mapping):
            if value.get("resourceType") == "OperationOutcome":
                return True
            links = value.get("link")
            if isinstance(links, list) and any(
                isinstance(x, Mapping) and x.get("relation") == "next" for x in links
            ):
                return True
    return False


class FhirGate:
    """At most `limit` FHIR-bound calls at once in this process (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit) if limit else None

    @contextmanager
    def admit(self, bound: bool) -> Iterator[None]:
        if self._slots is None or not bound:
            yield
            return
        if not self._slots.acquire(blocking=False):
            metrics.count_shed()
            raise Overloaded(
                "too many calls are waiting on FHIR servers; retry shortly", retry_after=RETRY_AFTER_S
            )
        try:
            yield
        finally:
            self._slots.release()
