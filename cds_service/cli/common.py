"""What every `cds-service` command shares: its one-line errors and its configuration."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from cds_service.settings import Settings


class CliError(Exception):
    """Bad input or configuration for a command: one line on stderr, exit 2."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from the CDS_* environment; a bad value is a CliError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = "CDS_" + str(err["loc"][0]).upper() if err.get("loc") else "configuration"
        raise CliError(f"invalid configuration {field}: {err['msg'].removeprefix('Value error, ')}") from None
    except SettingsError as exc:  # a value pydantic-settings could not even decode
        raise CliError(f"invalid configuration: {exc}") from None
