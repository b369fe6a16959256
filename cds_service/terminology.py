"""The value sets of mappings/, loaded once, answering "what concept is this coding?".

Clinical knowledge lives in the YAML files; this module only knows how to match codings:
system + code, ICD-10 by dotless prefix, ICD-10-PCS by 7-character pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from .paths import data_dir

Coding = tuple[str, str]  # (system, code)


def normalise_icd10(code: str) -> str:
    return code.replace(".", "").strip().upper()


@dataclass(frozen=True)
class CodeSet:
    """A set of codes in several systems, matched on system + code."""

    exact: frozenset[Coding]
    icd10_prefixes: tuple[str, ...] = ()
    icd10_systems: frozenset[str] = frozenset()
    pcs_pattern: re.Pattern[str] | None = None
    pcs_systems: frozenset[str] = frozenset()

    def matches(self, coding: Coding) -> bool:
        system, code = coding
        if (system, code) in self.exact:
            return True
        if self.icd10_prefixes and system in self.icd10_systems:
            return normalise_icd10(code).startswith(self.icd10_prefixes)
        if self.pcs_pattern is not None and system in self.pcs_systems:
            return self.pcs_pattern.fullmatch(code.strip().upper()) is not None
        return False

    def any(self, codings: Iterable[Coding]) -> bool:
        return any(self.matches(c) for c in codings)


@dataclass(frozen=True)
class Site:
    organ: str
    display: str
    region: str  # lung | thoracic | extrapulmonary
    codes: CodeSet


@dataclass(frozen=True)
class LocalTherapyKind:
    kind: str
    display: str
    codes: CodeSet
    requires_lung_site: bool = False


class Terminology:
    """Every value set the service reads, built from mappings/*.yaml."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._systems: dict[str, list[str]] = raw["systems"]
        cond, proc, obs = raw["conditions"], raw["procedures"], raw["observations"]

        self.primary_crc = self.code_set(cond["primary_crc"])
        self.sites = {
            organ: Site(organ, spec["display"], spec["region"], self.code_set(spec))
            for organ, spec in cond["sites"].items()
        }
        self.site_unspecified = self.code_set(cond["site_unspecified"])
        self.body_site_organs = {
            (s, str(code)): organ
            for code, organ in cond["body_sites"].items()
            for s in self._systems["snomed"]
        }
        self.lymphangitic = self.code_set(cond["lymphangitic"])
        self.malignant_pleural_effusion = self.code_set(cond["malignant_pleural_effusion"])

        self.primary_resection = self.code_set(proc["primary_resection"])
        self.local_excision = self.code_set(proc["local_excision"])
        self.lung_local_therapy = self._therapy_kinds(proc["lung_local_therapy"])
        self.liver_local_therapy = self._therapy_kinds(proc["liver_local_therapy"])
        self.lung_body_sites = self.code_set(proc["lung_body_sites"])

        cea = obs["cea"]
        self.cea_mass = self.code_set(cea["mass_codes"])
        self.cea_unconvertible = self.code_set(cea["unconvertible_codes"])
        self.cea_units: dict[str, float] = {str(k): float(v) for k, v in cea["units"].items()}
        self.cea_unit_aliases: dict[str, str] = {str(k): str(v) for k, v in cea["aliases"].items()}
        self.cea_statuses = frozenset(cea["statuses"])
        self.ucum_systems = frozenset(self._systems["ucum"])

        self.n_category = {kind: self.code_set(spec) for kind, spec in obs["n_category"].items()}
        self.n_values = {
            (s, str(code)): (kind, str(value))
            for kind, values in obs["n_values"].items()
            for code, value in values.items()
            for s in self._systems["snomed"]
        }
        self.ajcc_systems = frozenset(self._systems["ajcc"])
        self.stage_group = {kind: self.code_set(spec) for kind, spec in obs["stage_group"].items()}
        self.stage_values = {
            (s, str(code)): str(group)
            for code, group in obs["stage_values"].items()
            for s in self._systems["snomed"]
        }
        self.tnm_statuses = frozenset(obs["tnm_statuses"])
        # Every Observation code the service reads: the prefetch and FHIR searches ask for these only.
        self.observation_codes: tuple[Coding, ...] = tuple(
            (self._systems[alias][0], str(code))
            for spec in (
                cea["mass_codes"],
                cea["unconvertible_codes"],
                *obs["n_category"].values(),
                *obs["stage_group"].values(),
                obs["tumor_size"],
            )
            for alias in ("loinc", "snomed")
            for code in spec.get(alias) or ()
        )
        self.tumor_size = self.code_set(obs["tumor_size"])
        self.tumor_longest_dimension = self.code_set(obs["tumor_size"]["longest_dimension"])

    def code_set(self, spec: Mapping[str, Any]) -> CodeSet:
        exact: set[Coding] = set()
        for alias in ("snomed", "loinc", "cpt"):
            for code in spec.get(alias) or ():
                exact.update((system, str(code)) for system in self._systems[alias])
        prefixes = tuple(normalise_icd10(str(c)) for c in spec.get("icd10") or ())
        patterns = [str(p).upper() for p in spec.get("icd10pcs") or ()]
        return CodeSet(
            exact=frozenset(exact),
            icd10_prefixes=prefixes,
            icd10_systems=frozenset(self._systems["icd10"]) if prefixes else frozenset(),
            pcs_pattern=re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None,
            pcs_systems=frozenset(self._systems["icd10pcs"]) if patterns else frozenset(),
        )

    def _therapy_kinds(self, spec: Mapping[str, Any]) -> tuple[LocalTherapyKind, ...]:
        return tuple(
            LocalTherapyKind(kind, s["display"], self.code_set(s), bool(s.get("requires_lung_site")))
            for kind, s in spec.items()
        )

    def site_of(self, codings: Iterable[Coding]) -> Site | None:
        codings = list(codings)
        for site in self.sites.values():
            if site.codes.any(codings):
                return site
        return None

    def organ_of_body_site(self, codings: Iterable[Coding]) -> str | None:
        for coding in codings:
            organ = self.body_site_organs.get(coding)
            if organ:
                return organ
        return None

    def is_snomed(self, system: str) -> bool:
        return system in self._systems["snomed"]


@cache
def terminology() -> Terminology:
    folder = data_dir("mappings")
    raw = {
        name: yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        for name in ("systems", "conditions", "procedures", "observations")
    }
    return Terminology(raw)
