"""Liveness under saturation: calls hanging on FHIR servers never starve /healthz (real processes)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any

import pytest
import requests

from cds_service.hooks.catalogue import services
from cds_service.web.capacity import fhir_bound

from .conftest import FIXTURES, SERVICE_URL, hook_body, load
from .hostile import Peer, hang
from .test_cli import _start, _stop

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


def _fhir_call(fhir_url: str) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_url,
        "context": {"patientId": "p1", "userId": "Practitioner/1"},
    }


def test_which_calls_count_as_fhir_bound():
    service = next(iter(services().values()))
    full = hook_body(load(HIGH_RISK))
    assert not fhir_bound(full, service)  # no fhirServer: answered from the prefetch
    assert not fhir_bound({**full, "fhirServer": "https://ehr.example/fhir"}, service)  # complete prefetch
    assert fhir_bound(_fhir_call("https://ehr.example/fhir"), service)  # nothing prefetched
    partial = {**full, "fhirServer": "https://ehr.example/fhir", "prefetch": dict(full["prefetch"])}
    del partial["prefetch"]["procedures"]
    assert fhir_bound(partial, service)
    refused = {
        **partial,
        "prefetch": {**full["prefetch"], "procedures": {"resourceType": "OperationOutcome"}},
    }
    assert fhir_bound(refused, service)
    paged = {**partial, "prefetch": dict(full["prefetch"])}
    paged["prefetch"]["conditions"] = {
        **full["prefetch"]["conditions"],
        "link": [{"relation": "next", "url": "x"}],
    }
    assert fhir_bound(paged, service)
    assert not fhir_bound("not a dict", service)


@pytest.mark.slow
def test_healthz_answers_within_1_s_while_hook_calls_hang_on_a_fhir_server(tmp_path):
    with Peer() as fhir:
        fhir.behaviours = [hang(fhir.stop)]
        env = {"CDS_AUTH_REQUIRED": "false", "CDS_FHIR_TIMEOUT_S": "30"}
        proc, base = _start(["serve", "--workers", "1", "--threads", "4"], env, tmp_path)
        answers: list[requests.Response] = []
        try:

            def call() -> None:
                with contextlib.suppress(requests.RequestException):
                    answers.append(
                        requests.post(f"{base}{SERVICE_URL}", json=_fhir_call(fhir.url), timeout=60)
                    )

            callers = [threading.Thread(target=call) for _ in range(10)]
            for caller in callers:
                caller.start()
            time.sleep(1.5)
            assert fhir.connections >= 3  # three calls are waiting on the hanging server
            for _ in range(5):
                started = time.monotonic()
                assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
                assert time.monotonic() - started < 1.0
            # A call answered from its prefetch still gets its cards at once.
            started = time.monotonic()
            assert (
                requests.post(f"{base}{SERVICE_URL}", json=hook_body(load(HIGH_RISK)), timeout=5).status_code
                == 200
            )
            assert time.monotonic() - started < 1.0
            # The calls over the limit were shed at once: 503, Retry-After, an OperationOutcome.
            shed = [a for a in answers if a.status_code == 503]
            assert len(shed) == 10 - 3, [a.status_code for a in answers]
            for answer in shed:
                assert int(answer.headers["Retry-After"]) >= 1
                assert answer.json()["issue"][0]["code"] == "transient"
            metrics = requests.get(f"{base}/metrics", timeout=5).text
            assert "cds_calls_shed_total 7.0" in metrics
        finally:
            fhir.close()  # the hanging calls end (their server is gone)
            for caller in callers:
                caller.join(30)
            log = _stop(proc)
    assert "Traceback" not in log
