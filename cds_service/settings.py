"""Configuration from the environment (the README's Configuration table), validated at start-up."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cds_service.urls import is_loopback

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# SQLAlchemy's URL form, `backend[+driver]://…`.
_DATABASE_URL = re.compile(r"(?P<backend>[A-Za-z][A-Za-z0-9_]*)(?:\+[\w]+)?://")
# The commands that run the service; their logs default to JSON lines at INFO.
SERVER_COMMANDS = ("serve", "demo")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDS_", extra="ignore")

    auth_required: bool = True
    # NoDecode: our validators parse these so a bad value gets a clear message.
    trusted_issuers: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    public_base_url: str | None = None
    # The longest client-JWT lifetime (exp - iat) and the oldest iat accepted; the jti replay store
    # keeps each id until its token expires, so this also bounds how long it keeps them.
    jwt_max_age_s: int = Field(default=3600, gt=0, le=86400)
    database_url: str = "sqlite:///cds-service.db"
    # Key of the HMAC that replaces patient ids in the audit store. Unset: a random key per
    # start, so hashes cannot be linked across restarts or instances (store.py warns about it).
    audit_key: SecretStr | None = None
    # The local store-and-forward spool of audit records and feedback (store/spool.py): written before
    # each answer, fsync'd and forwarded to the database behind it. Unset: a `cds-audit-spool`
    # folder beside a SQLite database file, or in the working directory for PostgreSQL.
    audit_spool_dir: str | None = None
    # False skips the fsync (a killed process still loses nothing; a power cut can lose the last
    # second's records): for benchmarks and throwaway runs.
    audit_fsync: bool = True
    # Whether each answer waits for its record's fsync. False (the default): the record is written
    # before the answer (a killed process loses nothing) and fsync'd right behind it by the spool's
    # syncer thread (within about 5 ms); a power cut or kernel crash can lose the records of the
    # last moments (at most 1,000 records or half a second: then answers wait for the disk).
    audit_sync_before_answer: bool = False
    # The spool's cap in bytes (its folder, every process's records): reached only when the database
    # has not taken records for a long time; then hook calls and feedback are answered 503 until it
    # does (an answer without its audit record is not given). About 1 KB per call.
    audit_spool_max_bytes: int = Field(default=1 << 30, ge=64 * 1024)
    fhir_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Hook calls waiting on FHIR servers at once per worker process; the next is answered 503 with
    # Retry-After. Unset: `serve` uses its threads less one (a thread stays free for /healthz).
    max_fhir_calls: int | None = Field(default=None, ge=1)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    cea_max_age_days: int = Field(default=90, gt=0)
    # Outbound FHIR safety: http only to loopback unless explicitly allowed.
    allow_insecure_fhir: bool = False
    # Base URLs fhirServer must lie under: a list for every caller, or a JSON object naming them per
    # trusted issuer (`{"<iss>": ["https://..."], "*": [...]}`); unset: any (within the rules).
    fhir_server_allowlist: Annotated[list[str] | dict[str, list[str]], NoDecode] = Field(default_factory=list)
    fhir_max_response_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    # Per hook call, across all its searches and pages: decompressed bytes and Bundle entries read.
    fhir_max_call_bytes: int = Field(default=24 * 1024 * 1024, gt=0)
    fhir_max_call_entries: int = Field(default=25_000, gt=0)
    # Fetch threads (one HTTP exchange each) at once in this process; a call finding none free is a 503.
    fhir_fetch_threads: int = Field(default=96, ge=4, le=1024)
    # Origins of browser-based CDS clients allowed on the service endpoints (CORS); `*`: any. Safe as
    # a default: the client JWT travels in a header, never in a cookie a browser would attach.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # Demo mode: the embedded fixtures served at /fhir, auth off.
    demo: bool = False
    # The card preview page at /: always on in `demo`; in `serve` only when asked for, since
    # anyone who reaches it can make the service call FHIR servers (within the rules above).
    preview: bool = False
    # The `cds-service` process itself (read by the command, not by the app): gunicorn's pool for
    # `serve` (`--workers`/`--threads` override these) and the logs of every command.
    workers: int = Field(default=2, ge=1, le=256)
    threads: int = Field(default=8, ge=1, le=1024)
    # Unset: INFO for `serve`, `demo` and `migrate`; WARNING for `evaluate`, `report` and `fixtures`,
    # whose stderr is kept for their one-line errors and reports.
    log_level: LogLevel | None = None
    # Unset: JSON lines for the servers (`serve`, `demo`), text for the tools.
    log_format: Literal["json", "text"] | None = None

    def level_for(self, command: str) -> str:
        return self.log_level or ("INFO" if command in (*SERVER_COMMANDS, "migrate") else "WARNING")

    def json_logs_for(self, command: str) -> bool:
        return (self.log_format or ("json" if command in SERVER_COMMANDS else "text")) == "json"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = value.strip()
            value = (value.upper() if info.field_name == "log_level" else value.lower()) or None
        return value

    @field_validator("trusted_issuers", mode="before")
    @classmethod
    def _issuers_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"CDS_TRUSTED_ISSUERS is not a JSON object: {exc.msg}") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError('must be a JSON object {"<iss>": "<JWKS URL>", ...}')
        return value

    @field_validator("trusted_issuers")
    @classmethod
    def _issuers_https(cls, value: dict[str, str]) -> dict[str, str]:
        # The JWKS decides which tokens we accept: plain http would let anyone on the path swap keys.
        for iss, url in value.items():
            parts = urlsplit(url)
            secure = parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or ""))
            if not secure or not parts.hostname:
                raise ValueError(
                    f"the JWKS URL of {iss!r} must be an https URL (http only on loopback), not {url!r}"
                )
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str | None) -> str | None:
        # The JWT aud is compared with {base}/cds-services/{id}: a typo here refuses every call.
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an absolute http(s) URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("audit_key")
    @classmethod
    def _audit_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("CDS_AUDIT_KEY must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # The form and the backend only (the store parses the rest when it opens): every command checks
        # its settings at start, and this module stays free of SQLAlchemy.
        match = _DATABASE_URL.match(value)
        if not match or match["backend"].lower() not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                "CDS_DATABASE_URL is not a SQLite or PostgreSQL database URL "
                "(e.g. sqlite:///cds.db or postgresql://user:pass@host/db)"
            )
        return value

    @field_validator("fhir_server_allowlist", "cors_origins", mode="before")
    @classmethod
    def _allowlist(cls, value: Any) -> Any:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith(("[", "{")):
                value = json.loads(stripped)
            else:
                return [v.strip() for v in stripped.split(",") if v.strip()]
        if isinstance(value, dict):  # per issuer: one URL or a list of them
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # A browser's Origin header never ends in "/": "https://ehr.example.org/" would match no call.
        return [v.rstrip("/") or v for v in value]

    def fhir_servers_for(self, issuer: str | None) -> list[str] | None:
        """The fhirServer bases allowed for a call from `issuer`; None: no allowlist set."""
        allowlist = self.fhir_server_allowlist
        if isinstance(allowlist, list):
            return allowlist or None
        if issuer is None:  # auth off: any listed server
            return [url for urls in allowlist.values() for url in urls]
        return [*allowlist.get(issuer, []), *allowlist.get("*", [])]
