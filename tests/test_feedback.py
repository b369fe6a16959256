"""CDS Hooks 2.0 feedback through HTTP, on SQLite and PostgreSQL: validation, storage, idempotency,
and the audit of the hook calls whose cards the feedback names."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select, text

from cds_service.settings import Settings
from cds_service.store.database import feedback, hook_call, hook_card
from cds_service.web.app import create_app

from .conftest import FIXTURES, SERVICE_URL, TODAY, hook_body, load
from .test_http_contract import assert_operation_outcome

FEEDBACK_URL = f"{SERVICE_URL}/feedback"
HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


@pytest.fixture
def app(database_url):
    app = create_app(
        Settings(auth_required=False, database_url=database_url, audit_key="a" * 32), today=lambda: TODAY
    )
    app.config["TESTING"] = False
    return app


@pytest.fixture
def audit(app):
    return app.extensions["cds.audit"]


@pytest.fixture
def card(client) -> dict[str, Any]:
    """A real card, as an EHR shows it (the hook call is audited, so feedback can name it)."""
    resp = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
    assert resp.status_code == 200
    (card,) = resp.get_json()["cards"]
    assert card["suggestions"] and card["overrideReasons"]
    return card


def _accepted(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": "2026-03-01T10:05:31Z",
    }


def _overridden(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "Discussed at MDT already"},
        "outcomeTimestamp": "2026-03-01T10:06:00.52Z",
    }


def _rows(audit, table=feedback) -> list[dict[str, Any]]:
    audit.flush()  # audit records are written just behind the answers
    with audit.store.read() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()]


# --- accepted, overridden, the lenient single object ------------------------------------------------


def test_accepted_with_suggestions_is_stored(client, audit, card):
    resp = client.post(FEEDBACK_URL, json={"feedback": [_accepted(card)]})
    assert resp.status_code == 200 and resp.get_json() == {}
    (row,) = _rows(audit)
    assert row["card_uuid"] == card["uuid"] and row["outcome"] == "accepted"
    assert row["accepted_suggestions"] == [card["suggestions"][0]["uuid"]]
    assert row["outcome_timestamp"].isoformat() == "2026-03-01T10:05:31+00:00"
    assert row["service_id"] == "crc-metastases" and row["received_at"] is not None


def test_overridden_with_reason_and_comment_is_stored(client, audit, card):
    assert client.post(FEEDBACK_URL, json={"feedback": [_overridden(card)]}).status_code == 200
    (row,) = _rows(audit)
    reason = card["overrideReasons"][0]
    assert (row["outcome"], row["override_system"], row["override_code"], row["override_display"]) == (
        "overridden",
        reason.get("system"),
        reason["code"],
        reason["display"],
    )
    assert row["user_comment"] == "Discussed at MDT already" and row["accepted_suggestions"] == []


def test_overridden_without_a_reason_is_stored(client, audit, card):
    body = {
        "feedback": [
            {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:00:00Z"}
        ]
    }
    assert client.post(FEEDBACK_URL, json=body).status_code == 200
    assert _rows(audit)[0]["override_code"] is None


def test_a_single_feedback_object_is_accepted_leniently(client, audit, card):
    resp = client.post(FEEDBACK_URL, json=_overridden(card))
    assert resp.status_code == 200 and resp.get_json() == {}
    assert len(_rows(audit)) == 1


def test_several_entries_in_one_post(client, audit, card):
    other = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).get_json()["cards"][0]
    resp = client.post(FEEDBACK_URL, json={"feedback": [_accepted(card), _overridden(other)]})
    assert resp.status_code == 200
    assert [r["outcome"] for r in _rows(audit)] == ["accepted", "overridden"]


def test_a_duplicate_is_idempotent(client, audit, card):
    body = {"feedback": [_accepted(card)]}
    assert client.post(FEEDBACK_URL, json=body).status_code == 200
    assert client.post(FEEDBACK_URL, json=body).status_code == 200
    assert client.post(FEEDBACK_URL, json=_accepted(card)).status_code == 200  # same entry, other form
    assert len(_rows(audit)) == 1
    later = {**_accepted(card), "outcomeTimestamp": "2026-03-02T08:00:00Z"}  # a new interaction
    assert client.post(FEEDBACK_URL, json=later).status_code == 200
    assert len(_rows(audit)) == 2


def test_two_clinicians_without_outcome_timestamps_are_two_rows(client, audit, card):
    # Nothing tells two identical answers without a timestamp apart: each POST is its own answer.
    entry = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"reason": card["overrideReasons"][0]},
    }
    assert client.post(FEEDBACK_URL, json=entry).status_code == 200
    assert client.post(FEEDBACK_URL, json=entry).status_code == 200
    assert client.post(FEEDBACK_URL, json={"feedback": [entry, entry]}).status_code == 200  # once per POST
    assert len(_rows(audit)) == 3


def test_card_uuids_are_compared_case_insensitively(client, audit, card):
    body = {**_accepted(card), "card": card["uuid"].upper()}
    assert client.post(FEEDBACK_URL, json=body).status_code == 200
    assert _rows(audit)[0]["card_uuid"] == card["uuid"]


# --- refused, nothing stored ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b"", b"[]", b'"feedback"'],
    ids=["invalid-json", "undecodable", "empty", "array", "string"],
)
def test_a_body_that_is_not_a_json_object_is_400(client, audit, body):
    assert_operation_outcome(
        client.post(FEEDBACK_URL, data=body, content_type="application/json"), 400, "invalid"
    )
    assert _rows(audit) == []


INVALID = {
    "feedback-not-a-list": lambda c: {"feedback": _accepted(c)},
    "empty-object": lambda c: {},
    "empty-list": lambda c: {"feedback": []},
    "bad-outcome": lambda c: {"feedback": [{**_accepted(c), "outcome": "ignored"}]},
    "entry-without-card": lambda c: {"feedback": [{k: v for k, v in _accepted(c).items() if k != "card"}]},
    "non-uuid-card": lambda c: {"feedback": [{**_accepted(c), "card": "card-1"}]},
    "entry-not-an-object": lambda c: {"feedback": ["accepted"]},
    "overridden-with-suggestions": lambda c: {
        "feedback": [{**_overridden(c), "acceptedSuggestions": [{"id": "x"}]}]
    },
    "suggestion-without-id": lambda c: {"feedback": [{**_accepted(c), "acceptedSuggestions": [{}]}]},
    "reason-without-code": lambda c: {
        "feedback": [{**_overridden(c), "overrideReason": {"reason": {"system": "x"}}}]
    },
    "bad-timestamp": lambda c: {"feedback": [{**_accepted(c), "outcomeTimestamp": "yesterday"}]},
    "one-bad-entry-of-two": lambda c: {"feedback": [_accepted(c), {**_overridden(c), "outcome": "maybe"}]},
}


@pytest.mark.parametrize("name", INVALID)
def test_malformed_feedback_is_400_and_stores_nothing(client, audit, card, name):
    issue = assert_operation_outcome(client.post(FEEDBACK_URL, json=INVALID[name](card)), 400, "invalid")
    assert "feedback" in issue["diagnostics"]
    assert _rows(audit) == []


def test_accepted_without_suggestions_is_stored(client, audit, card):
    body = {**_accepted(card)}
    body.pop("acceptedSuggestions")
    assert client.post(FEEDBACK_URL, json=body).status_code == 200
    assert len(_rows(audit)) == 1


def test_unknown_service_is_404(client, card):
    assert_operation_outcome(
        client.post("/cds-services/nope/feedback", json=_accepted(card)), 404, "not-found"
    )


def test_an_unknown_card_is_422_and_nothing_is_stored(client, audit, card):
    unknown = str(uuid.uuid4())
    body = {"feedback": [_accepted(card), {**_overridden(card), "card": unknown}]}
    issue = assert_operation_outcome(client.post(FEEDBACK_URL, json=body), 422, "not-found")
    assert unknown in issue["diagnostics"] and "nothing was stored" in issue["diagnostics"]
    assert _rows(audit) == []


def test_feedback_is_503_when_the_store_cannot_be_asked_about_a_card(client, audit, card, caplog):
    """A database failure while checking an unsigned card is the store's StoreDown, answered 503
    (the EHR may retry), never 422 (final) and never a 500; nothing is stored."""
    assert audit.flush()  # the card's own audit record is in; only the check below meets the failure
    with audit.store.engine.begin() as conn:
        conn.execute(text("DROP TABLE hook_card"))
    unsigned = {**_overridden(card), "card": str(uuid.uuid4())}
    issue = assert_operation_outcome(client.post(FEEDBACK_URL, json=unsigned), 503, "transient")
    assert "nothing was stored" in issue["diagnostics"]
    assert "could not check feedback" in caplog.text
    assert _rows(audit) == []


def test_a_suggestion_the_card_does_not_have_is_422(client, audit, card):
    body = {**_accepted(card), "acceptedSuggestions": [{"id": str(uuid.uuid4())}]}
    assert_operation_outcome(client.post(FEEDBACK_URL, json=body), 422, "not-found")
    assert _rows(audit) == []


def test_feedback_is_authenticated_like_hook_calls(database_url):
    app = create_app(Settings(auth_required=True, database_url=database_url))
    resp = app.test_client().post(FEEDBACK_URL, json={"card": str(uuid.uuid4()), "outcome": "overridden"})
    issue = assert_operation_outcome(resp, 401, "security")
    assert issue["diagnostics"] == "authentication failed"


def test_feedback_answers_cors(client):
    pre = client.options(
        FEEDBACK_URL,
        headers={"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code in (200, 204) and pre.headers["Access-Control-Allow-Origin"] == "*"


# --- the audit of hook calls ------------------------------------------------------------------------------


def test_each_hook_call_is_audited_with_its_cards_and_no_patient_id(client, audit):
    body = hook_body(load(HIGH_RISK))
    answer = client.post(SERVICE_URL, json=body).get_json()
    (call,) = _rows(audit, hook_call)
    (card,) = _rows(audit, hook_card)
    assessment = answer["cards"][0]["extension"]["crc-cds-assessment"]
    assert call["hook_instance"] == body["hookInstance"] and call["service_id"] == "crc-metastases"
    assert call["fhir_mode"] == "prefetch" and call["latency_ms"] > 0 and call["card_count"] == 1
    assert call["patient_hash"] == audit.store.patient_hash(body["context"]["patientId"])
    assert body["context"]["patientId"] not in str(call)
    assert card["card_uuid"] == answer["cards"][0]["uuid"]
    assert (
        card["model"],
        card["recommendation"],
        card["score_min"],
        card["score_max"],
        card["risk_group"],
    ) == (
        assessment["model"],
        assessment["recommendation"],
        assessment["score"]["min"],
        assessment["score"]["max"],
        assessment["group"],
    )
    assert card["suggestion_uuids"] == [s["uuid"] for s in answer["cards"][0]["suggestions"]]


def test_calls_without_cards_and_refused_calls(client, audit):
    assert (
        client.post(SERVICE_URL, json=hook_body(load(FIXTURES / "16-out-peritoneal-only.json"))).status_code
        == 200
    )
    assert client.post(SERVICE_URL, json={"hook": "patient-view"}).status_code == 400
    calls = _rows(audit, hook_call)
    assert [c["card_count"] for c in calls] == [0]  # refused calls are in the logs and metrics only


def test_a_store_failure_never_turns_a_good_answer_into_an_error(client, audit, caplog):
    with audit.store.engine.begin() as conn:  # a real failure: the table the audit writes to is gone
        conn.execute(text("DROP TABLE hook_card"))
    body = hook_body(load(HIGH_RISK))
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200 and len(resp.get_json()["cards"]) == 1
    assert not audit.flush() and audit.pending == 1  # kept in the spool, not lost
    failures = [r for r in caplog.records if "refuses records" in r.getMessage()]
    assert failures and body["context"]["patientId"] not in caplog.text
    assert _rows(audit, hook_call) == []  # the call and its cards are one transaction
    hook_card.create(audit.store.engine)  # the operator repairs the database
    assert audit.flush() and audit.pending == 0
    assert len(_rows(audit, hook_call)) == 1 and len(_rows(audit, hook_card)) == 1


def test_feedback_is_kept_while_the_store_cannot_take_it(client, audit, card):
    assert audit.flush()  # the card's own audit record is in
    with audit.store.engine.begin() as conn:  # a real failure: the feedback table is gone
        conn.execute(text("DROP TABLE feedback"))
    assert client.post(FEEDBACK_URL, json=_accepted(card)).status_code == 200
    assert not audit.flush() and audit.pending == 1
    feedback.create(audit.store.engine)
    assert audit.flush()
    assert [r["outcome"] for r in _rows(audit)] == ["accepted"]


def test_long_client_strings_are_stored_whole(client, audit):
    # hookInstance is bounded at 64 characters (longer is a 400); up to that it is stored whole.
    assert (
        client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK), hook_instance="h" * 65)).status_code == 400
    )
    body = hook_body(load(HIGH_RISK), hook_instance="h" * 64)
    card = client.post(SERVICE_URL, json=body).get_json()["cards"][0]
    assert _rows(audit, hook_call)[0]["hook_instance"] == "h" * 64
    long_reason = {"system": "urn:" + "s" * 900, "code": "c" * 900, "display": "d" * 900}
    entry = {"card": card["uuid"], "outcome": "overridden", "overrideReason": {"reason": long_reason}}
    assert client.post(FEEDBACK_URL, json=entry).status_code == 200
    assert _rows(audit)[0]["override_display"] == "d" * 900
