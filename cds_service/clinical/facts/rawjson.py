"""Values read from raw FHIR JSON, before (or instead of) validation: type-checked, never coerced."""

from __future__ import annotations

import math
import sys
from typing import Any


def json_str(value: Any) -> str | None:
    """A raw JSON value that must be a string (a code, a status), else None."""
    return value if type(value) is str else None


def json_list(value: Any) -> list:
    """A raw JSON value that must be an array, else empty."""
    return value if type(value) is list else []


_LARGEST_INT = int(sys.float_info.max)


def measured_number(value: Any) -> float | None:
    """A concentration or a size: a finite number, not negative (a JSON boolean is not a number)."""
    if type(value) is not float and (type(value) is not int or value > _LARGEST_INT):
        return None  # a string, a boolean, or an integer beyond any float
    # NaN fails both comparisons; infinity the second.
    return float(value) if 0 <= value < math.inf else None
