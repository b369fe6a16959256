"""Where the data folders (mappings/, cards/, fixtures/fhir/) are, installed or in a checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_DIRS = {"mappings": "mappings", "cards": "cards", "fixtures": "fixtures/fhir"}


@cache
def data_dir(kind: str) -> Path:
    """The folder holding `kind` ("mappings", "cards" or "fixtures").

    `pip install .` places the top-level data folders inside the package (see pyproject.toml);
    a checkout (or an editable install) has them beside the package.
    """
    installed = _PACKAGE / kind
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / _CHECKOUT_DIRS[kind]
