"""Small builders of real FHIR R4 resources (plain JSON dicts) for unit tests of the clinical core.

Every builder returns a resource that validates with fhir.resources R4B (tests/test_facts.py checks
it). Defaults describe the context patient `Patient/p1`; pass `subject="Patient/other"` for another
patient's data. Ids are generated unless given, so tests only name the ones they cite.
"""

from __future__ import annotations

import itertools
from typing import Any

from cds_service.clinical.chart import Chart, build_chart

PATIENT_ID = "p1"

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10CM_OID = "urn:oid:2.16.840.1.113883.6.90"
ICD10_WHO = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
AJCC = "http://cancerstaging.org"
UCUM = "http://unitsofmeasure.org"
CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"

_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_CLIN_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"

# Codes the tests use most (terminology.md).
CRC_SNOMED = "363406005"  # malignant tumour of colon
LUNG_MET_SNOMED = "94391008"  # secondary malignant neoplasm of lung
LIVER_MET_SNOMED = "94381002"
BONE_MET_SNOMED = "94222008"
BRAIN_MET_SNOMED = "94225005"
GENERIC_MET_SNOMED = "128462008"  # metastatic malignant neoplasm, no site
LYMPHANGITIC_SNOMED = "255119002"
LUNG_BODY_SITE = "39607008"
LIVER_BODY_SITE = "10200004"
COLECTOMY_SNOMED = "23968004"
POLYPECTOMY_SNOMED = "274031008"
WEDGE_SNOMED = "232632009"  # wedge resection of lung

_ids = itertools.count(1)


def _id(prefix: str, given: str | None) -> str:
    return given if given is not None else f"{prefix}-{next(_ids)}"


def concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _subject(subject: str) -> dict[str, str]:
    return {"reference": subject}


def patient(
    id: str = PATIENT_ID, *, deceased_boolean: bool | None = None, deceased_datetime: str | None = None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": id,
        "name": [{"family": "Test", "given": ["Unit"]}],
        "gender": "female",
        "birthDate": "1960-05-01",
    }
    if deceased_boolean is not None:
        resource["deceasedBoolean"] = deceased_boolean
    if deceased_datetime is not None:
        resource["deceasedDateTime"] = deceased_datetime
    return resource


def condition(
    system: str,
    code: str,
    *,
    onset: str | None = None,
    onset_start: str | None = None,
    recorded: str | None = None,
    verification: str | None = "confirmed",
    body_site: str | None = None,
    stage_summary: str | None = None,
    stage_system: str = SNOMED,
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """A Condition; `onset` is onsetDateTime, `onset_start` onsetPeriod.start, `body_site` SNOMED."""
    resource: dict[str, Any] = {"resourceType": "Condition", "id": _id("cond", id)}
    if verification != "entered-in-error":  # con-5: no clinicalStatus on an entered-in-error Condition
        resource["clinicalStatus"] = concept(_CLIN_STATUS, "active")
    if verification is not None:
        resource["verificationStatus"] = concept(_VER_STATUS, verification)
    resource["code"] = concept(system, code)
    if body_site is not None:
        resource["bodySite"] = [concept(SNOMED, body_site)]
    resource["subject"] = _subject(subject)
    if onset is not None:
        resource["onsetDateTime"] = onset
    if onset_start is not None:
        resource["onsetPeriod"] = {"start": onset_start}
    if recorded is not None:
        resource["recordedDate"] = recorded
    if stage_summary is not None:
        resource["stage"] = [{"summary": concept(stage_system, stage_summary)}]
    return resource


def crc(onset: str | None = "2019-01-10", **kw: Any) -> dict[str, Any]:
    """The colorectal primary (SNOMED malignant tumour of colon)."""
    kw.setdefault("id", "crc")
    return condition(SNOMED, CRC_SNOMED, onset=onset, **kw)


def lung_met(onset: str | None = "2021-01-10", **kw: Any) -> dict[str, Any]:
    kw.setdefault("id", "lung-met")
    return condition(SNOMED, LUNG_MET_SNOMED, onset=onset, **kw)


def procedure(
    system: str,
    code: str,
    status: str = "completed",
    *,
    performed: str | None = None,
    period_start: str | None = None,
    body_site: str | None = None,
    reason: str | None = None,
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """A Procedure; `performed` is performedDateTime, `period_start` performedPeriod.start,
    `body_site` a SNOMED body structure, `reason` a reference (reasonReference)."""
    resource: dict[str, Any] = {
        "resourceType": "Procedure",
        "id": _id("proc", id),
        "status": status,
        "code": concept(system, code),
        "subject": _subject(subject),
    }
    if performed is not None:
        resource["performedDateTime"] = performed
    if period_start is not None:
        resource["performedPeriod"] = {"start": period_start}
    if body_site is not None:
        resource["bodySite"] = [concept(SNOMED, body_site)]
    if reason is not None:
        resource["reasonReference"] = [{"reference": reason}]
    return resource


def resection(performed: str | None = "2019-02-01", **kw: Any) -> dict[str, Any]:
    """A completed colectomy (SNOMED 23968004)."""
    kw.setdefault("id", "resection")
    return procedure(SNOMED, COLECTOMY_SNOMED, kw.pop("status", "completed"), performed=performed, **kw)


def cea(
    value: float | None,
    unit: str | None = "ng/mL",
    code: str = "2039-6",
    *,
    comparator: str | None = None,
    status: str = "final",
    date: str | None = "2021-01-05",
    system: str = LOINC,
    value_string: str | None = None,
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """A CEA Observation; `unit` is written as a UCUM code (None: a quantity without a unit)."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("cea", id),
        "status": status,
        "category": [concept("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
        "code": concept(system, code),
        "subject": _subject(subject),
    }
    if date is not None:
        resource["effectiveDateTime"] = date
    if value is not None:
        quantity: dict[str, Any] = {"value": value}
        if comparator is not None:
            quantity["comparator"] = comparator
        if unit is not None:
            quantity.update(unit=unit, system=UCUM, code=unit)
        resource["valueQuantity"] = quantity
    elif value_string is not None:
        resource["valueString"] = value_string
    return resource


_N_CODE = {"pathologic": "21900-6", "clinical": "21906-3", "unspecified": "21912-1"}
_STAGE_CODE = {"pathologic": "21902-2", "clinical": "21908-9", "unspecified": "21914-7"}


def _coded_value(value: str) -> dict[str, Any]:
    """A SNOMED code (all digits) or an AJCC string such as "cN1a" (http://cancerstaging.org)."""
    return concept(SNOMED, value) if value.isdigit() else concept(AJCC, value)


def _staging(
    code: str, value: str, date: str | None, focus: str | None, status: str, id: str | None, subject: str
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("stage", id),
        "status": status,
        "code": concept(LOINC, code),
        "subject": _subject(subject),
    }
    if focus is not None:
        resource["focus"] = [{"reference": focus}]
    if date is not None:
        resource["effectiveDateTime"] = date
    resource["valueCodeableConcept"] = _coded_value(value)
    return resource


def n_category(
    kind: str,
    value: str,
    date: str | None = "2019-02-10",
    *,
    focus: str | None = "Condition/crc",
    status: str = "final",
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """TNM regional nodes category; kind pathologic | clinical | unspecified (LOINC code)."""
    return _staging(_N_CODE[kind], value, date, focus, status, id, subject)


def stage_group(
    kind: str,
    value: str,
    date: str | None = "2019-02-10",
    *,
    focus: str | None = "Condition/crc",
    status: str = "final",
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """TNM stage group; kind pathologic | clinical | unspecified (LOINC code)."""
    return _staging(_STAGE_CODE[kind], value, date, focus, status, id, subject)


def by_type(resources: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        groups.setdefault(resource["resourceType"], []).append(resource)
    return groups


def chart(*resources: dict[str, Any]) -> Chart:
    """A Chart for Patient/p1 via build_chart: the first Patient given (else a living p1) is the patient."""
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    others = [r for r in resources if r["resourceType"] != "Patient"]
    return build_chart(PATIENT_ID, patients[0] if patients else patient(), [by_type(others)])


# --- liver score: liver metastases, mCODE Tumor BodyStructures and TumorSize, therapy ---------

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
RIGHT_LIVER_LOBE = "48521005"  # structure of right lobe of liver
LEFT_LIVER_LOBE = "69842003"  # structure of left lobe of liver
HEPATECTOMY_CPT = "47120"  # hepatectomy, partial lobectomy
TUMOR_SIZE_LOINC = "21889-1"
LONGEST_DIMENSION_LOINC = "33728-7"
_RELATED_CONDITION = "http://hl7.org/fhir/StructureDefinition/condition-related"


def liver_met(onset: str | None = "2021-01-10", **kw: Any) -> dict[str, Any]:
    """A liver-metastasis Condition (SNOMED 94381002); `body_site` a SNOMED code such as a liver lobe."""
    kw.setdefault("id", "liver-met")
    return condition(SNOMED, LIVER_MET_SNOMED, onset=onset, **kw)


def tumor(
    *,
    location: str | None = LIVER_BODY_SITE,
    related: str | None = None,
    active: bool | None = None,
    id: str | None = None,
    patient: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """An mCODE Tumor BodyStructure: `location` a SNOMED body structure, `related` a Condition reference."""
    resource: dict[str, Any] = {"resourceType": "BodyStructure", "id": _id("tumor", id)}
    if related is not None:
        resource["extension"] = [{"url": _RELATED_CONDITION, "valueReference": {"reference": related}}]
    if active is not None:
        resource["active"] = active
    resource["morphology"] = concept(SNOMED, "367651003")
    if location is not None:
        resource["location"] = concept(SNOMED, location)
    resource["patient"] = _subject(patient)
    return resource


def tumor_size(
    value: float,
    unit: str = "cm",
    *,
    focus: str | None,
    date: str | None = "2021-01-12",
    status: str = "final",
    component: bool = True,
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """An mCODE TumorSize Observation (LOINC 21889-1): the longest dimension (component 33728-7, or the
    Observation's own valueQuantity when `component` is False), `unit` a UCUM code; `focus` a reference."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("size", id),
        "status": status,
        "code": concept(LOINC, TUMOR_SIZE_LOINC),
        "subject": _subject(subject),
    }
    if focus is not None:
        resource["focus"] = [{"reference": focus}]
    if date is not None:
        resource["effectiveDateTime"] = date
    quantity = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if component:
        resource["component"] = [{"code": concept(LOINC, LONGEST_DIMENSION_LOINC), "valueQuantity": quantity}]
    else:
        resource["valueQuantity"] = quantity
    return resource


def medication_request(
    code: str = "32592",
    *,
    authored: str = "2021-02-01",
    status: str = "active",
    id: str | None = None,
    subject: str = f"Patient/{PATIENT_ID}",
) -> dict[str, Any]:
    """A MedicationRequest for a systemic-therapy drug (RxNorm; default oxaliplatin, IN 32592)."""
    return {
        "resourceType": "MedicationRequest",
        "id": _id("med", id),
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": concept(RXNORM, code),
        "subject": _subject(subject),
        "authoredOn": authored,
    }
