"""JSON in and out: the one parser of request bodies, FHIR server answers and files, the one writer
of answers (HTTP and `cds-service evaluate` print the same bytes).

orjson parses a chart about twice as fast as the standard library, which is most of a hook call's
cost on a large chart. Whatever orjson refuses the standard library gets a second look at, so what
is accepted and the errors raised stay those of `json`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(document: Any, *, sort_keys: bool = False) -> str:
    """The one serialisation of every answer: HTTP and `cds-service evaluate` print the same bytes."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(document, option=option).decode()
    except TypeError:  # what orjson cannot write (an integer beyond 64 bits) the standard library can
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def loads(raw: bytes | str) -> Any:
    """Parse a JSON document; errors are `json.JSONDecodeError` (with `msg` and `lineno`).

    orjson refuses some valid JSON (integers beyond 64 bits, UTF-16, a BOM) that `json` reads.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
