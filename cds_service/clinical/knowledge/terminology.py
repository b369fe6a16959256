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

from cds_service.paths import data_dir

Coding = tuple[str, str]  # (system, code)


def normalise_icd10(code: str) -> str:
    return code.replace(".", "").strip().upper()


# The longest code each prefix- or pattern-matched system has, without its dot. A longer "code" is
# not one: it is unreadable, and refusing it first keeps every lookup bounded whatever a FHIR server
# or prefetch sends (a 200,000-character code once cost seconds of prefix tries).
MAX_ICD10_CHARS = 7  # ICD-10-CM: 3 to 7 characters (8 with the dot)
MAX_ICD10PCS_CHARS = 7  # always exactly 7
MAX_ICDO3_CHARS = 4  # topography: C00.0 to C80.9


def readable_icd10(code: str, limit: int = MAX_ICD10_CHARS) -> str | None:
    """The dotless upper-case code, or None when it is too long to be an ICD code at all."""
    if len(code) > limit + 3:  # the dot, and a space either side that normalising strips
        return None
    normalised = normalise_icd10(code)
    return normalised if len(normalised) <= limit else None


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
            normalised = readable_icd10(code)
            return normalised is not None and normalised.startswith(self.icd10_prefixes)
        if self.pcs_pattern is not None and system in self.pcs_systems:
            pcs = code.strip().upper() if len(code) <= MAX_ICD10PCS_CHARS + 2 else ""
            return self.pcs_pattern.fullmatch(pcs) is not None
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
class ConditionConcept:
    """What a Condition's code says, for this service."""

    kind: str  # primary | site | unspecified | lymphangitic | effusion
    site: Site | None = None


_CONDITION_PRIORITY = ("primary", "site", "lymphangitic", "effusion", "unspecified")


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
        cond, proc, obs, meds = raw["conditions"], raw["procedures"], raw["observations"], raw["medications"]

        self.primary_crc = self.code_set(cond["primary_crc"])
        self.sites = {
            organ: Site(organ, spec["display"], spec["region"], self.code_set(spec))
            for organ, spec in cond["sites"].items()
        }
        self.site_unspecified = self.code_set(cond["site_unspecified"])
        self.body_site_organs = {
            (s, str(code)): organ
            for organ, spec in cond["body_sites"].items()
            for code in spec.get("snomed") or ()
            for s in self._systems["snomed"]
        }
        self._icdo3_systems = frozenset(self._systems["icdo3"])
        self._icdo3_organs = tuple(
            (normalise_icd10(str(prefix)), organ)
            for organ, spec in cond["body_sites"].items()
            for prefix in spec.get("icdo3") or ()
        )
        self.lymphangitic = self.code_set(cond["lymphangitic"])
        self.malignant_pleural_effusion = self.code_set(cond["malignant_pleural_effusion"])

        self._condition_exact: dict[Coding, ConditionConcept] = {}
        self._condition_icd: dict[str, ConditionConcept] = {}
        for concept, code_set in (
            *((ConditionConcept("site", s), s.codes) for s in self.sites.values()),
            (ConditionConcept("unspecified"), self.site_unspecified),
            (ConditionConcept("lymphangitic"), self.lymphangitic),
            (ConditionConcept("effusion"), self.malignant_pleural_effusion),
            (ConditionConcept("primary"), self.primary_crc),  # last: C78.5 is the primary, not a site
        ):
            self._condition_exact.update(dict.fromkeys(code_set.exact, concept))
            self._condition_icd.update(dict.fromkeys(code_set.icd10_prefixes, concept))
        self._icd10_systems = frozenset(self._systems["icd10"])
        context = cond["context"]
        self.rectal_primary = self.code_set(context["rectal_primary"])
        self.other_primary_cancer = self.code_set(context["other_primary_cancer"])
        self.lung_sides = {side: self.code_set(spec) for side, spec in context["lung_sides"].items()}
        self.unconfirmed_verification = frozenset(context["unconfirmed_verification"])
        self.resolved_clinical = frozenset(context["resolved_clinical"])
        words = sorted((str(w) for w in cond["text_metastasis_keywords"]), key=len, reverse=True)
        self.text_metastasis = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE
        )

        self.primary_resection = self.code_set(proc["primary_resection"])
        self.local_excision = self.code_set(proc["local_excision"])
        self.lung_local_therapy = self._therapy_kinds(proc["lung_local_therapy"])
        self.liver_local_therapy = self._therapy_kinds(proc["liver_local_therapy"])
        # Procedure codes → tags, so that unrelated procedures cost one dict lookup per coding.
        tagged: list[tuple[str, CodeSet]] = [
            ("resection", self.primary_resection),
            ("excision", self.local_excision),
            ("systemic", self.code_set(proc["systemic_therapy"])),
        ]
        tagged += [(f"lung:{k.kind}", k.codes) for k in self.lung_local_therapy]
        tagged += [(f"liver:{k.kind}", k.codes) for k in self.liver_local_therapy]
        self._procedure_exact: dict[Coding, list[str]] = {}
        for tag, code_set in tagged:
            for coding in code_set.exact:
                self._procedure_exact.setdefault(coding, []).append(tag)
        self._procedure_patterns = [(tag, s) for tag, s in tagged if s.pcs_pattern is not None]
        # A local-therapy tag (`lung:<kind>`, `liver:<kind>`) → (organ, kind), for Procedures and
        # ServiceRequests alike.
        self.local_therapy_by_tag: dict[str, tuple[str, LocalTherapyKind]] = {
            f"{organ}:{k.kind}": (organ, k)
            for organ, group in (("lung", self.lung_local_therapy), ("liver", self.liver_local_therapy))
            for k in group
        }
        self._pcs_systems = frozenset(self._systems["icd10pcs"])

        cea = obs["cea"]
        self.cea_mass = self.code_set(cea["mass_codes"])
        self.cea_unconvertible = self.code_set(cea["unconvertible_codes"])
        self.cea_units: dict[str, float] = {str(k): float(v) for k, v in cea["units"].items()}
        self.cea_unit_aliases: dict[str, str] = {str(k): str(v) for k, v in cea["aliases"].items()}
        self.cea_statuses = frozenset(cea["statuses"])
        self.ucum_systems = frozenset(self._systems["ucum"])

        self.n_category = {kind: self.code_set(spec) for kind, spec in obs["n_category"].items()}
        # (system, code) → (kind, N value "0" | "1" | "2" | "X", the category as charted, e.g. "pN2b")
        self.n_values: dict[Coding, tuple[str, str, str]] = {
            (s, str(code)): (kind, _n_digit(str(label)), str(label))
            for kind, values in obs["n_values"].items()
            for code, label in values.items()
            for s in self._systems["snomed"]
        }
        self.ajcc_systems = frozenset(self._systems["ajcc"])
        self.stage_group = {kind: self.code_set(spec) for kind, spec in obs["stage_group"].items()}
        # (system, code) → (Roman group "I".."IV", the stage as the card shows it)
        self.stage_values: dict[Coding, tuple[str, str]] = {
            (s, str(code)): (str(spec["group"]), str(spec["label"]))
            for code, spec in obs["stage_values"].items()
            for s in self._systems["snomed"]
        }
        self.tnm_statuses = frozenset(obs["tnm_statuses"])
        self._read_medications(meds)
        # (system, code) → ("cea", "mass" | "unconvertible") | ("n" | "stage", kind) | ("size", ""):
        # one dict lookup per coding classifies an Observation (charts hold thousands of them).
        index: dict[Coding, tuple[str, str]] = {}
        for family, spec_by_kind in (("n", obs["n_category"]), ("stage", obs["stage_group"])):
            for kind, spec in spec_by_kind.items():
                index.update(dict.fromkeys(self.code_set(spec).exact, (family, kind)))
        index.update(dict.fromkeys(self.cea_unconvertible.exact, ("cea", "unconvertible")))
        index.update(dict.fromkeys(self.cea_mass.exact, ("cea", "mass")))
        index.update(dict.fromkeys(self.code_set(obs["tumor_size"]).exact, ("size", "")))
        history = obs["history_of_metastatic_cancer"]
        self.history_any = self.code_set(history["any"])
        self.history_organs = {organ: self.code_set(s) for organ, s in history["by_organ"].items()}
        index.update(dict.fromkeys(self.history_any.exact, ("history", "")))
        for organ, code_set in self.history_organs.items():
            index.update(dict.fromkeys(code_set.exact, ("history", organ)))
        molecular = obs["molecular"]
        index.update(dict.fromkeys(self.code_set(molecular["msi"]).exact, ("molecular", "msi")))
        index.update(dict.fromkeys(self.code_set(molecular["variant"]).exact, ("molecular", "variant")))
        self.gene_studied = self.code_set(molecular["gene_studied"])
        self.molecular_genes: dict[str, str] = {str(k): str(v) for k, v in molecular["genes"].items()}
        self.observation_index = index
        # Every Observation code the service reads: the prefetch and FHIR searches ask for these only.
        self.observation_codes: tuple[Coding, ...] = tuple(
            (self._systems[alias][0], str(code))
            for spec in (
                cea["mass_codes"],
                cea["unconvertible_codes"],
                *obs["n_category"].values(),
                *obs["stage_group"].values(),
                obs["tumor_size"],
                history["any"],
                *history["by_organ"].values(),
                molecular["msi"],
                molecular["variant"],
            )
            for alias in ("loinc", "snomed")
            for code in spec.get(alias) or ()
        )
        self.tumor_size = self.code_set(obs["tumor_size"])
        self.tumor_longest_dimension = self.code_set(obs["tumor_size"]["longest_dimension"])

    def _read_medications(self, meds: Mapping[str, Any]) -> None:
        systems = meds["rxnorm_systems"]
        self.drug_codes: dict[Coding, str] = {
            (system, str(code)): drug
            for drug, spec in meds["drugs"].items()
            for code in spec["rxnorm"]
            for system in systems
        }
        self.drug_excluded = frozenset(
            (system, str(code)) for code in meds["exclude_rxnorm"] for system in systems
        )
        named = [(str(n), drug) for drug, spec in meds["drugs"].items() for n in spec["names"]]
        named += [(str(r), str(r)) for r in meds.get("regimens") or ()]
        names = sorted(named, key=lambda item: -len(item[0]))
        self.drug_name_pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(n) for n, _ in names) + r")(?![\w-])", re.IGNORECASE
        )
        self.drug_by_name = {n.lower(): drug for n, drug in names}
        self.drug_exclude_words = re.compile(
            "|".join(re.escape(w) for w in meds["exclude_words"]), re.IGNORECASE
        )
        self.medication_statuses_ignored = {k: frozenset(v) for k, v in meds["statuses_ignored"].items()}
        self.planned_request_statuses = frozenset(meds["planned_request_statuses"])

    def drug_of_codings(self, codings: Iterable[Coding]) -> str | None:
        """The colorectal systemic-therapy drug an RxNorm coding names, if any."""
        codings = list(codings)
        if any(c in self.drug_excluded for c in codings):
            return None
        return next((self.drug_codes[c] for c in codings if c in self.drug_codes), None)

    def drug_of_text(self, text: str) -> str | None:
        """A whole-word ingredient name in free text, unless the text names a non-systemic form."""
        if not text or self.drug_exclude_words.search(text):
            return None
        match = self.drug_name_pattern.search(text)
        return self.drug_by_name[match.group(1).lower()] if match else None

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
        """The organ a body site names: a SNOMED body structure, or an ICD-O-3 topography by prefix."""
        for coding in codings:
            organ = self.body_site_organs.get(coding)
            if organ:
                return organ
            if coding[0] in self._icdo3_systems:
                code = readable_icd10(coding[1], MAX_ICDO3_CHARS)
                if code is None:
                    continue
                for prefix, organ in self._icdo3_organs:
                    if code.startswith(prefix):
                        return organ
        return None

    def condition_concept(self, codings: Iterable[Coding]) -> ConditionConcept | None:
        """The concept of a Condition code: one dict lookup per coding (longest ICD-10 prefix wins)."""
        hits = []
        for system, code in codings:
            hit = self._condition_exact.get((system, code))
            if hit is None and system in self._icd10_systems:
                # At most 5 dict lookups: a readable code has at most 7 characters.
                normalised = readable_icd10(code) or ""
                for length in range(len(normalised), 2, -1):
                    hit = self._condition_icd.get(normalised[:length])
                    if hit is not None:
                        break
            if hit is not None:
                hits.append(hit)
        if not hits:
            return None
        return min(hits, key=lambda c: _CONDITION_PRIORITY.index(c.kind))

    def procedure_tags(self, codings: Iterable[Coding]) -> list[str]:
        """Tags (`resection`, `excision`, `systemic`, `lung:<kind>`, `liver:<kind>`) of a Procedure code."""
        tags: list[str] = []
        for coding in codings:
            tags.extend(self._procedure_exact.get(coding, ()))
            if coding[0] in self._pcs_systems:
                tags.extend(tag for tag, s in self._procedure_patterns if s.matches(coding))
        return tags


@cache
def terminology() -> Terminology:
    folder = data_dir("mappings")
    raw = {
        name: yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        for name in ("systems", "conditions", "procedures", "observations", "medications")
    }
    return Terminology(raw)


def _n_digit(label: str) -> str:
    """The N value of an AJCC category label ("pN2b" → "2", "cNX" → "X")."""
    after = label.upper().split("N", 1)[1] if "N" in label.upper() else ""
    if not after or after[0] not in "0123X":
        raise ValueError(f"mappings/observations.yaml n_values: {label!r} is not an AJCC N category")
    return after[0]
