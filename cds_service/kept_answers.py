"""Kept answers: a chart sent again is answered from the cards drafted the first time.

An EHR calls patient-view each time a clinician opens the chart, with the same prefetch and a new
hookInstance (and access token). When the whole chart was prefetched (nothing fetched from a FHIR
server) and reading it logged nothing, the answer depends only on the request body, the day and the
service's settings: it is kept, without its uuids, by the request's exact JSON text without the
values of hookInstance and fhirAuthorization, with the service, the day, the evidence base URL and
the caller's issuer. Only a request identical but for those two values gets a kept answer back,
with uuids minted from its own hookInstance: the answer evaluating it again would give.

Found by the request's bytes as sent, before they are parsed: parsing and freeing a 500-resource
chart is most of what a kept answer costs. The two values are cut out of the bytes where their
members are (`_cut`), and the few bytes cut out are all that is parsed and checked (`Hit`). Their
places are checked when an answer is kept (`Answers.keep`): the bytes parsed again with a mark in
each place must give the request's own hookInstance and fhirAuthorization members, so a member of
that name nested in the chart, or the request's own written with escapes, is never taken for them.
A request whose bytes cannot be cut (two members of a name, a value neither a string nor an object)
is kept by its decoded members written again instead (`Answers.decoded_key`), found after parsing.

At most `entries` answers and `json_bytes` bytes of request text are kept (least recently used
out first); a request over `largest` bytes is evaluated every time.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from cds_service.clinical.kept import KeptLru

V = TypeVar("V")

_HOOK_INSTANCE = b'"hookInstance"'
_FHIR_AUTHORIZATION = b'"fhirAuthorization"'
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
# A JSON string token (RFC 8259 §7).
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
# Members the decoded key leaves out: the call's own id, and the FHIR access token (never kept after
# the call). Whether anything is fetched depends on the prefetch and fhirServer, which the key holds,
# not on the token, and a kept answer is one for which nothing was fetched.
_NOT_IN_KEY = frozenset({"hookInstance", "fhirAuthorization"})


@dataclass(frozen=True)
class Cut:
    """A request's bytes cut at its hookInstance value (and fhirAuthorization value, if any)."""

    key: bytes
    hook_instance: tuple[int, int]  # where the value is in the request's bytes
    fhir_authorization: tuple[int, int] | None


@dataclass(frozen=True)
class Hit(Generic[V]):
    """A kept answer for a request, and that request's own values, parsed from its bytes."""

    kept: V
    hook_instance: Any
    fhir_authorization: Any  # None when the request has none


def _value_end(raw: bytes, start: int) -> int | None:
    """Where the JSON string or object starting at `start` ends (None: not one, or not well formed)."""
    if raw[start : start + 1] == b'"':
        match = _STRING.match(raw, start)
        return match.end() if match else None
    if raw[start : start + 1] != b"{":
        return None
    depth, i = 0, start
    while i < len(raw):
        c = raw[i]
        if c == 0x22:  # a string: skipped whole, braces in it do not count
            match = _STRING.match(raw, i)
            if match is None:
                return None
            i = match.end()
            continue
        if c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


_ABSENT = (0, 0)


def _span(raw: bytes, member: bytes) -> tuple[int, int] | None:
    """The value's place of the one member named `member` (_ABSENT: none; None: cannot be cut)."""
    count = raw.count(member)
    if count == 0:
        return _ABSENT
    if count != 1:
        return None
    colon = _COLON.match(raw, raw.index(member) + len(member))
    if colon is None:
        return None
    end = _value_end(raw, colon.end())
    return None if end is None else (colon.end(), end)


def _cut(raw: bytes, head: bytes, largest: int) -> Cut | None:
    hook_instance = _span(raw, _HOOK_INSTANCE)
    authorization = _span(raw, _FHIR_AUTHORIZATION)
    if hook_instance is None or hook_instance is _ABSENT or authorization is None:
        return None
    spans = sorted(s for s in (hook_instance, authorization) if s is not _ABSENT)
    pieces, at = [b"r", head], 0
    for start, end in spans:
        pieces.append(raw[at:start])
        at = end
    pieces.append(raw[at:])
    key = b"".join(pieces)
    if len(key) > largest:
        return None
    return Cut(key, hook_instance, None if authorization is _ABSENT else authorization)


class Answers(Generic[V]):
    """A worker's recent answers by request (see the module's docstring)."""

    def __init__(self, entries: int = 64, json_bytes: int = 8_000_000, largest: int = 1_000_000) -> None:
        self._largest = largest
        self._kept: KeptLru[bytes, V] = KeptLru(entries, json_bytes, len)

    def cut(self, raw: bytes, *parts: Any) -> Cut | None:
        """The request's key by its bytes (`parts`: what else the answer depends on), or None."""
        return _cut(raw, orjson.dumps(parts), self._largest)

    def find(self, raw: bytes, cut: Cut) -> Hit[V] | None:
        """The kept answer for the request's bytes (`cut` from them), with its hookInstance and
        fhirAuthorization (parsed from their bytes; still to be validated), or None: parse the
        request and evaluate it."""
        kept = self._kept.get(cut.key)
        if kept is None:
            return None
        try:
            hook_instance = orjson.loads(raw[slice(*cut.hook_instance)])
            authorization = (
                orjson.loads(raw[slice(*cut.fhir_authorization)]) if cut.fhir_authorization else None
            )
        except orjson.JSONDecodeError:  # a lone surrogate orjson refuses: the whole path decides
            return None
        return Hit(kept, hook_instance, authorization)

    def decoded_key(self, body: dict[str, Any], *parts: Any) -> bytes | None:
        """The key of a request whose bytes cannot be cut: its decoded members but hookInstance and
        fhirAuthorization, written again. None when it must not be kept."""
        members = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
        try:
            text = orjson.dumps(members, option=orjson.OPT_PASSTHROUGH_DATETIME)
        except TypeError:  # integers over 64 bits, lone surrogates, non-JSON values
            return None
        # orjson writes NaN and infinities as null: a request with a null is not kept.
        return None if len(text) > self._largest or b"null" in text else b"d" + orjson.dumps(parts) + text

    def keep(
        self, raw: bytes | None, cut: Cut | None, body: dict[str, Any], parts: tuple[Any, ...], kept: V
    ) -> None:
        """Keep the answer to a request (`body`, parsed from `raw`, `cut` from them): by its bytes
        when they can be cut and the cut is where its members are (else not at all: an odd request,
        evaluated every time); by its decoded members when they cannot be cut."""
        if cut is None:
            key = self.decoded_key(body, *parts)
            if key is not None:
                self._kept.put(key, kept)
        elif raw is not None and _cut_is_the_members(raw, body, cut):
            self._kept.put(cut.key, kept)

    def get_decoded(self, key: bytes) -> V | None:
        return self._kept.get(key)

    def clear(self) -> None:
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


def _cut_is_the_members(raw: bytes, body: dict[str, Any], cut: Cut) -> bool:
    """Whether the cut is at the request's own hookInstance and fhirAuthorization values: the bytes
    with a fresh mark in each place parse to the request's members holding the marks."""
    if (cut.fhir_authorization is not None) != ("fhirAuthorization" in body):
        return False
    mark = secrets.token_hex(16)
    marks = {cut.hook_instance: orjson.dumps(mark)}
    if cut.fhir_authorization is not None:
        marks[cut.fhir_authorization] = orjson.dumps({mark: 0})
    pieces: list[bytes] = []
    at = 0
    for (start, end), text in sorted(marks.items()):
        pieces += (raw[at:start], text)
        at = end
    pieces.append(raw[at:])
    try:
        marked = orjson.loads(b"".join(pieces))
    except orjson.JSONDecodeError:
        return False
    return (
        type(marked) is dict
        and marked.get("hookInstance") == mark
        and (cut.fhir_authorization is None or marked.get("fhirAuthorization") == {mark: 0})
    )
