"""Observations read for context, never scored as such: mCODE HistoryOfMetastaticCancer (which counts
for the extrapulmonary factor only, docs/clinical-rules.md §8.29) and KRAS/NRAS/BRAF and MSI results (§8.27)."""

from __future__ import annotations

from fhir.resources.R4B.observation import Observation

from cds_service.clinical.facts.dates import observation_date
from cds_service.clinical.facts.model import Entry, Metastasis, PatientFacts
from cds_service.clinical.fhir_fields import codings, display_of, ref_of
from cds_service.clinical.knowledge.terminology import Terminology


def read_history(
    observation: Observation, organ_of_code: str, term: Terminology, facts: PatientFacts
) -> None:
    """A history of metastatic disease at a site: the code's site, else the Observation's bodySite.

    valueBoolean false asserts no history (mCODE); a history with no readable site is not counted
    (nothing says it was outside the lung)."""
    if observation.status not in term.tnm_statuses or observation.valueBoolean is False:
        return
    organ = organ_of_code or term.organ_of_body_site(codings(observation.bodySite))
    site = term.sites.get(organ) if organ else None
    if site is None:
        return
    source = ref_of(observation)
    facts.history.append(
        Metastasis(
            source,
            site.organ,
            f"history of {site.display} metastases",
            site.region,
            observation_date(observation),
            "history",
        )
    )


def read_molecular(observation: Observation, kind: str, term: Terminology, facts: PatientFacts) -> None:
    """An MSI interpretation, or a genetic variant assessment of KRAS, NRAS or BRAF (by HGNC id)."""
    if observation.status not in term.tnm_statuses:
        return
    value = display_of(observation.valueCodeableConcept) or observation.valueString or "no result value"
    if kind == "msi":
        label = "MSI"
    else:
        genes = sorted(
            {
                term.molecular_genes[code]
                for component in observation.component or []
                if term.gene_studied.any(codings(component.code))
                for _, code in codings(component.valueCodeableConcept)
                if code in term.molecular_genes
            }
        )
        if not genes:
            return  # a variant of another gene
        label = "/".join(genes)
    when = observation_date(observation)
    facts.molecular.append(Entry(ref_of(observation), f"{label}: {value}", when))
