"""Where the data folders (mappings/, cards/, fixtures/fhir/) are, installed or in a checkout."""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path

_CHECKOUT_DIRS = {"mappings": "mappings", "cards": "cards", "fixtures": "fixtures/fhir"}


@cache
def data_dir(kind: str) -> Path:
    """The folder holding `kind` ("mappings", "cards" or "fixtures").

    `pip install .` places the top-level data folders inside the package (see pyproject.toml);
    a checkout used without installing has them beside the package.
    """
    checkout = Path(__file__).resolve().parent.parent / _CHECKOUT_DIRS[kind]
    if checkout.is_dir():
        return checkout
    return Path(str(importlib.resources.files(f"cds_service.{kind}")))
