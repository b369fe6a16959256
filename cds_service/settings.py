"""Configuration from the environment (service contract §3), validated at start-up."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDS_", extra="ignore")

    auth_required: bool = True
    # NoDecode: our validators parse these so a bad value gets a clear message.
    trusted_issuers: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    public_base_url: str | None = None
    database_url: str = "sqlite:///cds-service.db"
    # Key of the HMAC that replaces patient ids in the audit store (issue 8). Unset: a random key per
    # start, so hashes cannot be linked across restarts or instances (store.py warns about it).
    audit_key: SecretStr | None = Field(default=None, min_length=32)
    fhir_timeout_s: float = Field(default=5.0, gt=0, le=120)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    cea_max_age_days: int = Field(default=90, gt=0)
    # Outbound FHIR safety (issue 4): http only to loopback unless explicitly allowed.
    allow_insecure_fhir: bool = False
    fhir_server_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fhir_max_response_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # Demo mode: the embedded fixtures served at /fhir, auth off.
    demo: bool = False

    @field_validator("trusted_issuers", mode="before")
    @classmethod
    def _issuers_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"CDS_TRUSTED_ISSUERS is not a JSON object: {exc.msg}") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            raise ValueError("CDS_DATABASE_URL is not a database URL (e.g. sqlite:///cds.db)") from None
        return value

    @field_validator("fhir_server_allowlist", mode="before")
    @classmethod
    def _allowlist(cls, value: Any) -> Any:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [v.strip() for v in stripped.split(",") if v.strip()]
        return value
