"""The demo patients of fixtures/fhir/: read for `demo`, exported as FHIR transaction Bundles and
loaded into a FHIR server (`cds-service fixtures export | load`).

The files are written against fixed dates (the regression oracle, `evaluate FILE`, reads them as
they are). Served or exported for a person to try, each patient's dates are moved together so that
its latest event falls a week before today: every interval of its story (disease-free interval,
CEA before the metastasis, treatment start) is kept, and only a CEA that is old *within the story*
reads as stale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cds_service.cli.common import CliError
from cds_service.settings import Settings

# The latest event of a shifted demo chart is this many days before today.
RECENT_DAYS = 7
# A FHIR date, dateTime or instant with a day (partial dates such as `2020-03` are left as they are).
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?")
_UUID_NAMESPACE = uuid.UUID("6f1c3a52-2d7e-4c1e-9b1a-0d6f4b8e7c21")


def demo_files() -> list[Path]:
    from cds_service.paths import data_dir

    return sorted(p for p in data_dir("fixtures").glob("*.json") if p.name != "expected.json")


def _bundle(path: Path) -> dict[str, Any] | None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return doc if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" else None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def shift_dates(bundle: dict[str, Any], today: dt.date) -> dict[str, Any]:
    """A copy of one patient's Bundle with every full date moved by the same number of days, so that
    its latest date is RECENT_DAYS before `today`."""
    days = [dt.date.fromisoformat(m[1]) for s in _strings(bundle) if (m := _DATE.fullmatch(s))]
    if not days:
        return bundle
    delta = (today - dt.timedelta(days=RECENT_DAYS)) - max(days)

    def move(text: str) -> str:
        match = _DATE.fullmatch(text)
        if not match:
            return text
        return (dt.date.fromisoformat(match[1]) + delta).isoformat() + (match[2] or "")

    shifted: dict[str, Any] = _map_strings(bundle, move)
    return shifted


def demo_resources(shift_to: dt.date | None = None) -> list[dict[str, Any]]:
    """The demo patients' resources: as the files hold them, or with dates shifted for `shift_to`."""
    resources: list[dict[str, Any]] = []
    for path in demo_files():
        bundle = _bundle(path)
        if bundle is None:
            continue
        if shift_to is not None:
            bundle = shift_dates(bundle, shift_to)
        resources.extend(
            e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)
        )
    return resources


def transaction_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """The chart as a FHIR R4 transaction: every resource POSTed under a `urn:uuid` fullUrl, and
    references between them written as those urn:uuids, so the server assigns the ids."""
    resources = [e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
    urns = {
        f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, r['resourceType'] + '/' + r['id'])}"
        for r in resources
    }
    for entry in bundle.get("entry", []):  # references written as the entry's fullUrl
        resource = entry.get("resource") or {}
        if isinstance(entry.get("fullUrl"), str) and "id" in resource:
            urns[entry["fullUrl"]] = urns[f"{resource['resourceType']}/{resource['id']}"]

    def relink(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: relink(v) for k, v in value.items()}
            ref = out.get("reference")
            if isinstance(ref, str) and ref in urns:
                out["reference"] = urns[ref]
            return out
        if isinstance(value, list):
            return [relink(v) for v in value]
        return value

    entries = []
    for resource in resources:
        key = f"{resource['resourceType']}/{resource['id']}"
        body = relink({k: v for k, v in resource.items() if k not in ("id", "meta")})
        entries.append(
            {
                "fullUrl": urns[key],
                "resource": body,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _stories() -> dict[str, str]:
    from cds_service.paths import data_dir

    expected = json.loads((data_dir("fixtures") / "expected.json").read_text(encoding="utf-8"))
    return {name: str(v.get("story", "")) for name, v in expected.items()}


def demo_transactions(today: dt.date) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, transaction Bundle) for every demo patient, dates shifted for `today`."""
    for path in demo_files():
        bundle = _bundle(path)
        if bundle is not None:
            yield path.name, transaction_bundle(shift_dates(bundle, today))


def export(args: argparse.Namespace, _settings: Settings) -> int:
    target = Path(args.dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = 0
        for name, bundle in demo_transactions(dt.datetime.now(dt.UTC).date()):
            (target / name).write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
            written += 1
    except OSError as exc:
        raise CliError(f"cannot write to {target} ({exc.strerror or exc})") from None
    print(f"{written} transaction Bundles written to {target}")
    return 0


def _patient_location(answer: dict[str, Any], request: dict[str, Any]) -> str | None:
    """The server's id of the Patient, from the transaction-response (entries in request order)."""
    for sent, got in zip(request["entry"], answer.get("entry") or [], strict=False):
        if sent["resource"]["resourceType"] != "Patient" or not isinstance(got, dict):
            continue
        location = (got.get("response") or {}).get("location") or ""
        parts = str(location).split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return parts[-1]
        resource = got.get("resource") or {}
        return str(resource["id"]) if resource.get("id") else None
    return None


def load(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.errors import FetchError
    from cds_service.fetch.transaction import TransactionClient

    try:
        client = TransactionClient(args.fhir_base_url, args.token, settings)
    except FetchError as exc:
        raise CliError(exc.diagnostics) from None
    stories = _stories()
    loaded = 0
    try:
        for name, bundle in demo_transactions(dt.datetime.now(dt.UTC).date()):
            try:
                answer = client.post(bundle)
            except FetchError as exc:
                raise CliError(f"{name}: {exc.diagnostics} ({loaded} patient(s) loaded before it)") from None
            loaded += 1
            patient = _patient_location(answer, bundle) or "(id not in the answer)"
            print(f"{name}\tPatient/{patient}\t{stories.get(name, '')}", flush=True)
    finally:
        client.close()
    waited = f"; {client.retries} rate-limited answer(s) waited out" if client.retries else ""
    print(f"{loaded} demo patients loaded into {client.base}{waited}", file=sys.stderr)
    return 0
