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


def dump_bytes(document: Any, *, sort_keys: bool = False) -> bytes:
    """The one serialisation of every answer, as UTF-8: HTTP sends these bytes, `cds-service
    evaluate` prints them (`dumps`)."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(document, option=option)
    except TypeError:
        # What orjson cannot write the standard library can: an integer beyond 64 bits, or chart text
        # holding a lone UTF-16 surrogate (valid JSON as a \u escape, not encodable as UTF-8).
        return json.dumps(document, ensure_ascii=True, separators=(",", ":"), sort_keys=sort_keys).encode()


def dumps(document: Any, *, sort_keys: bool = False) -> str:
    """`dump_bytes` as text."""
    return dump_bytes(document, sort_keys=sort_keys).decode()


def loads(raw: bytes | str) -> Any:
    """Parse a JSON document; every error is a `json.JSONDecodeError` (with `msg` and `lineno`).

    orjson refuses some valid JSON (integers beyond 64 bits, UTF-16, a BOM) that `json` reads.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as exc:  # undecodable bytes, or an integer too long to convert
        raise json.JSONDecodeError(str(exc).split(":")[0], "", 0) from None
