"""The card rules of docs/clinical-rules.md §7 and §8.21, checked on any answer a test receives: the demo
charts (tests/test_card_rules.py) and every EHR recording pattern (tests/test_ehr_patterns.py,
tests/test_ehr_recording.py), so no chart shape gets a card that does not read in 10 seconds."""

from __future__ import annotations

import re
from typing import Any

MAX_DETAIL_CHARS = 2000
MAX_BULLETS = 5
MAX_SUMMARY_CHARS = 140  # "under 140 characters"
# A bullet opens with a capital, a digit or a sign (≥ 2 sites…), never a lower-case word or a `Type/id`.
_BULLET_START = re.compile(r"- (?:[A-Z≥≤<>\d])")
_RESOURCE_ID = re.compile(r"- \*?[A-Z][A-Za-z]+/[A-Za-z0-9.\-]+")
_NESTED = re.compile(r"\([^()]*\([^()]*\)[^()]*\)")


def assert_card_reads_in_ten_seconds(card: dict[str, Any], where: str = "") -> None:
    """§7: the recommendation first, the factor table, at most five bullets, the MDT line last, at most
    2,000 characters; and the style faults the oncology review named never come back."""
    detail, summary = card["detail"], card["summary"]
    lines = detail.strip().splitlines()
    assert len(summary) < MAX_SUMMARY_CHARS, (where, summary)
    assert len(detail) <= MAX_DETAIL_CHARS, (where, len(detail))
    assert re.fullmatch(r"\*\*[^*]+: [^*]+\.\*\*", lines[0]), (where, lines[0])
    assert lines[2].startswith("| Factor |"), (where, lines[:3])
    bullets = [line for line in lines if line.startswith("- ")]
    assert len(bullets) <= MAX_BULLETS, (where, bullets)
    assert lines[-1].startswith("*Decision support for the MDT"), (where, lines[-1])
    assert "DFS" not in lines[0], (where, lines[0])
    for bullet in bullets:
        assert _BULLET_START.match(bullet) and not _RESOURCE_ID.match(bullet), (where, bullet)
        assert not _NESTED.search(bullet), (where, bullet)
    assert not re.search(r"\w\(s\)", detail), (where, "a plural written as (s)")
    assert detail.count("upporting (retrospective") <= 1, (where, "the supporting label said twice")
    for fault in ("(qualifier value)", "unspecified stage", "American Joint Committee", "cRS "):
        assert fault not in detail, (where, fault)


def assert_answer_reads_in_ten_seconds(cards: list[dict[str, Any]], where: str = "") -> None:
    for card in cards:
        assert_card_reads_in_ten_seconds(card, where)
