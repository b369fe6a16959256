"""`cds-service report`: what the service said and how clinicians answered, from the store.

The window (`--since`) selects hook calls by the time they were answered; acceptance and override
figures are about the cards those calls showed, whenever their feedback arrived. Rates are per
distinct card (a retried call shows the same card uuid again; it is one card).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Select, distinct, func, select

from cds_service.store.repository import Store
from cds_service.store.schema import feedback, hook_call, hook_card

_PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RecommendationRow:
    model: str
    recommendation: str
    cards_shown: int  # times shown, retries included
    distinct_cards: int
    accepted: int  # distinct cards with an accepted feedback
    overridden: int  # distinct cards with an overridden feedback

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.distinct_cards if self.distinct_cards else None

    @property
    def override_rate(self) -> float | None:
        return self.overridden / self.distinct_cards if self.distinct_cards else None


@dataclass(frozen=True)
class OverrideReasonRow:
    system: str
    code: str
    display: str
    count: int
    with_comment: int


@dataclass(frozen=True)
class Report:
    since: dt.datetime | None
    calls: int
    calls_by_fhir_mode: dict[str, int]
    latency_ms: dict[str, float]  # p50, p90, p95, p99, max; empty without calls
    recommendations: list[RecommendationRow] = field(default_factory=list)
    override_reasons: list[OverrideReasonRow] = field(default_factory=list)
    feedback_entries: int = 0


def parse_since(text: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def build_report(store: Store, since: dt.datetime | None = None) -> Report:
    with store.read() as conn:
        by_mode = _calls_by_fhir_mode(conn, since)
        return Report(
            since=since,
            calls=sum(by_mode.values()),
            calls_by_fhir_mode=by_mode,
            latency_ms=_latency(conn, since),
            recommendations=_recommendations(conn, since),
            override_reasons=_override_reasons(conn, since),
            feedback_entries=_feedback_entries(conn, since),
        )


def _in_window(query: Select[Any], since: dt.datetime | None) -> Select[Any]:
    return query.where(hook_call.c.received_at >= since) if since else query


def _calls_by_fhir_mode(conn: Connection, since: dt.datetime | None) -> dict[str, int]:
    query = _in_window(select(hook_call.c.fhir_mode, func.count()).group_by(hook_call.c.fhir_mode), since)
    return {mode: count for mode, count in conn.execute(query)}


def _latency(conn: Connection, since: dt.datetime | None) -> dict[str, float]:
    # Percentiles in Python: SQLite has no percentile function, and a report can afford the scan.
    values = sorted(conn.execute(_in_window(select(hook_call.c.latency_ms), since)).scalars())
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    out = {f"p{p}": round(cuts[p - 1], 1) for p in _PERCENTILES}
    out["max"] = round(values[-1], 1)
    return out


def _window_cards(since: dt.datetime | None) -> Any:
    """The distinct cards shown in the window, with what they recommended."""
    query = select(hook_card.c.card_uuid, hook_card.c.model, hook_card.c.recommendation).join(
        hook_call, hook_call.c.id == hook_card.c.call_id
    )
    return _in_window(query, since).distinct().subquery("window_cards")


def _recommendations(conn: Connection, since: dt.datetime | None) -> list[RecommendationRow]:
    shown_query = _in_window(
        select(
            hook_card.c.model,
            hook_card.c.recommendation,
            func.count(),
            func.count(distinct(hook_card.c.card_uuid)),
        )
        .join(hook_call, hook_call.c.id == hook_card.c.call_id)
        .group_by(hook_card.c.model, hook_card.c.recommendation),
        since,
    )
    shown = {(m or "-", r or "-"): (n, d) for m, r, n, d in conn.execute(shown_query)}
    cards = _window_cards(since)
    answered_query = (
        select(
            cards.c.model, cards.c.recommendation, feedback.c.outcome, func.count(distinct(cards.c.card_uuid))
        )
        .join(feedback, feedback.c.card_uuid == cards.c.card_uuid)
        .group_by(cards.c.model, cards.c.recommendation, feedback.c.outcome)
    )
    answered: dict[tuple[str, str, str], int] = {
        (m or "-", r or "-", outcome): n for m, r, outcome, n in conn.execute(answered_query)
    }
    return [
        RecommendationRow(
            model=model,
            recommendation=recommendation,
            cards_shown=n,
            distinct_cards=d,
            accepted=answered.get((model, recommendation, "accepted"), 0),
            overridden=answered.get((model, recommendation, "overridden"), 0),
        )
        for (model, recommendation), (n, d) in sorted(shown.items())
    ]


def _window_feedback(since: dt.datetime | None) -> Any:
    cards = select(_window_cards(since).c.card_uuid).distinct().subquery("window_card_ids")
    return feedback.join(cards, cards.c.card_uuid == feedback.c.card_uuid)


def _override_reasons(conn: Connection, since: dt.datetime | None) -> list[OverrideReasonRow]:
    query = (
        select(
            feedback.c.override_system,
            feedback.c.override_code,
            func.max(feedback.c.override_display),
            func.count(),
            func.count(feedback.c.user_comment),
        )
        .select_from(_window_feedback(since))
        .where(feedback.c.outcome == "overridden")
        .group_by(feedback.c.override_system, feedback.c.override_code)
    )
    rows = [
        OverrideReasonRow(system or "-", code or "(no reason given)", display or "-", n, comments)
        for system, code, display, n, comments in conn.execute(query)
    ]
    return sorted(rows, key=lambda r: (-r.count, r.code))


def _feedback_entries(conn: Connection, since: dt.datetime | None) -> int:
    return conn.execute(select(func.count()).select_from(_window_feedback(since))).scalar_one()


# --- output ------------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = [list(map(str, headers)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def as_table(report: Report) -> str:
    window = f"since {report.since.isoformat()}" if report.since else "all time"
    modes = ", ".join(f"{mode} {n}" for mode, n in sorted(report.calls_by_fhir_mode.items())) or "-"
    lines = [f"CDS service report ({window})", "", f"Hook calls: {report.calls} ({modes})"]
    if report.latency_ms:
        lines.append("Latency (ms): " + ", ".join(f"{k} {v}" for k, v in report.latency_ms.items()))
    lines += ["", "Cards by recommendation:"]
    lines += _table(
        ["model", "recommendation", "shown", "cards", "accepted", "overridden", "acceptance", "override"],
        [
            (
                r.model,
                r.recommendation,
                r.cards_shown,
                r.distinct_cards,
                r.accepted,
                r.overridden,
                _rate(r.acceptance_rate),
                _rate(r.override_rate),
            )
            for r in report.recommendations
        ],
    )
    lines += ["", f"Feedback entries on these cards: {report.feedback_entries}", "Override reasons:"]
    lines += _table(
        ["code", "display", "system", "count", "with comment"],
        [(r.code, r.display, r.system, r.count, r.with_comment) for r in report.override_reasons],
    )
    return "\n".join(lines) + "\n"


def as_csv(report: Report) -> str:
    """One tidy table: section, key, metric, value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "key", "metric", "value"])
    writer.writerow(["calls", "all", "count", report.calls])
    for mode, n in sorted(report.calls_by_fhir_mode.items()):
        writer.writerow(["calls", f"fhir_mode={mode}", "count", n])
    for name, ms in report.latency_ms.items():
        writer.writerow(["latency_ms", "hook", name, ms])
    for r in report.recommendations:
        key = f"{r.model}/{r.recommendation}"
        metrics: tuple[tuple[str, int | float | str], ...] = (
            ("cards_shown", r.cards_shown),
            ("distinct_cards", r.distinct_cards),
            ("accepted", r.accepted),
            ("overridden", r.overridden),
            ("acceptance_rate", "" if r.acceptance_rate is None else round(r.acceptance_rate, 4)),
            ("override_rate", "" if r.override_rate is None else round(r.override_rate, 4)),
        )
        for metric, value in metrics:
            writer.writerow(["recommendation", key, metric, value])
    writer.writerow(["feedback", "all", "entries", report.feedback_entries])
    for reason in report.override_reasons:
        key = f"{reason.system}|{reason.code}"
        writer.writerow(["override_reason", key, "display", reason.display])
        writer.writerow(["override_reason", key, "count", reason.count])
        writer.writerow(["override_reason", key, "with_comment", reason.with_comment])
    return out.getvalue()
