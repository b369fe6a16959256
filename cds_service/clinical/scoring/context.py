"""What a card shows but never scores (docs/clinical-rules.md §8.27): one short line each, with its source.

Pure: PatientFacts in, ContextLine tuple out. The ids are the assessment's `context` ids.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cds_service.clinical.facts.model import PatientFacts

AGE_LIMIT_YEARS = 70  # the Li 2019 consensus Table 1 (age over 70 weighs on the choice of treatment)


@dataclass(frozen=True)
class ContextLine:
    id: str
    value: str
    sources: tuple[str, ...] = ()

    def assessment(self) -> dict:
        return {"id": self.id, "value": self.value, "sources": list(self.sources)}


QUOTE_CHARS = 80  # a chart entry is quoted up to this many characters


def quoted(texts: list[str]) -> str:
    """Chart entries as the card quotes them: at most three, each cut to QUOTE_CHARS."""
    cut = [t if len(t) <= QUOTE_CHARS else t[: QUOTE_CHARS - 1].rstrip() + "…" for t in texts[:3]]
    return "; ".join(f"“{t}”" for t in cut)


def _age(born: dt.date, today: dt.date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def age_when_found(facts: PatientFacts, detected: dt.date | None, today: dt.date | None) -> int | None:
    """Age in whole years on the day the card's metastases were found (the decision the papers' age
    limit is about; a chart date, so the same chart always gives the same line), else on the day of
    the call. A partial birthDate counts from its last day: the youngest the patient may be, so the
    line is shown only when every birthday the chart allows is over the limit."""
    born = facts.birth_date_last or facts.birth_date
    on = detected or today
    if born is None or on is None:
        return None
    return _age(born, on)


def _refs(*sources: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for s in sources if s))


def context_lines(facts: PatientFacts, organ: str, today: dt.date | None) -> tuple[ContextLine, ...]:
    """The context lines of the `organ` ("lung" | "liver") card, in a fixed order."""
    lines: list[ContextLine] = []
    detected, _ = facts.detected(organ)
    if organ == "lung":
        sides = {m.side for m in facts.sites("lung") if m.side}
        if {"left", "right"} <= sides:
            refs = _refs(*(m.source for m in facts.sites("lung") if m.side))
            lines.append(ContextLine("bilateral-lung-metastases", "lung metastases on both sides", refs))
    age = age_when_found(facts, detected, today)
    if age is not None and age > AGE_LIMIT_YEARS:
        when = f"when the {organ} metastases were found" if detected else "today"
        lines.append(ContextLine("age-over-70", f"age {age} {when}", _refs(f"Patient/{facts.patient_id}")))
    if facts.rectal_primary:
        lines.append(ContextLine("rectal-primary", "rectal primary", _refs(*facts.rectal_primary)))
    if facts.other_primaries:
        names = "; ".join(e.text for e in facts.other_primaries[:2])
        why = f"confirm by histology that the {organ} metastases are colorectal"
        lines.append(
            ContextLine(
                "other-primary-cancer",
                f"another primary cancer ({names}): {why}",
                _refs(*(e.source for e in facts.other_primaries)),
            )
        )
    before = facts.systemic_before(organ)
    if before:
        drugs = ", ".join(dict.fromkeys(t.drug for t in before))
        first = before[0]  # facts.systemic is in order of start
        since = (
            f"from {first.start}"
            if first.start_last is None
            else f"begun {first.start} to {first.start_last}"
        )
        lines.append(
            ContextLine(
                "prior-systemic-therapy",
                f"systemic therapy before the {organ} metastases ({drugs}, {since})",
                _refs(*(t.source for t in before)),
            )
        )
    unconfirmed = [m for m in facts.metastases if m.status == "unconfirmed"]
    if unconfirmed:
        lines.append(
            ContextLine(
                "unconfirmed-metastasis",
                "metastasis recorded as provisional or unconfirmed: histology to confirm",
                _refs(*(m.source for m in unconfirmed)),
            )
        )
    resolved = [
        m
        for m in facts.metastases
        if m.status == "resolved" and not facts.therapies(m.organ or "", done=True)
    ]
    if resolved:
        lines.append(
            ContextLine(
                "resolved-metastasis",
                "metastasis recorded as resolved with no local therapy in the chart: confirm current disease",
                _refs(*(m.source for m in resolved)),
            )
        )
    if organ == "lung":
        thoracic = [m for m in facts.metastases if m.region == "thoracic" and m.organ != "pleura"]
        if thoracic:
            names = ", ".join(dict.fromkeys(m.display for m in thoracic))
            lines.append(ContextLine("thoracic-nodes", names, _refs(*(m.source for m in thoracic))))
    if facts.text_metastases:
        lines.append(
            ContextLine(
                "uncoded-metastasis-entry",
                f"metastasis recorded only as text: {quoted([e.text for e in facts.text_metastases])}",
                _refs(*(e.source for e in facts.text_metastases)),
            )
        )
    if facts.molecular:
        results = "; ".join(f"{e.text}{f' ({e.date})' if e.date else ''}" for e in facts.molecular[:4])
        lines.append(ContextLine("molecular-status", results, _refs(*(e.source for e in facts.molecular))))
    else:
        lines.append(
            ContextLine("molecular-status", "KRAS/NRAS/BRAF and MSI/MMR results are not in the chart")
        )
    return tuple(lines)
