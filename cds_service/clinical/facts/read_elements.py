"""The elements the facts read, per resource type, and the fhir.resources models trimmed to them.

Why: validating a whole resource with its fhir.resources R4B model costs 0.2-0.5 ms, most of it on
elements no fact is read from (meta, narrative, identifier, subject, category...). The
facts are validated exactly where they are read: each element below is validated with the very
field fhir.resources declares for it (its type, its element model, its alias, whether it is
required), and no other element is. A quirk in an element the facts never read no longer makes the
service skip the resource: the service judges only what it reads (docs/clinical-decisions.md).

Keep READ in step with the facts code: an element read from a validated resource but missing here
is an AttributeError (the facts tests meet it), never a silent None. `name[x]` is a choice element,
every type of it kept, so that "only one onset[x]" still holds.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fhir.resources.R4B.bodystructure import BodyStructure
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import BaseModel, create_model

# Elements read from the raw JSON before validation (how a resource is picked: its code, status,
# medication) are listed too: the facts depend on them as much as on what they read from the model.
_MEDICATION = ("id", "status", "medication[x]", "contained")
READ: dict[Any, tuple[str, ...]] = {
    # conditions.py, dates.py: the concept and its site, whether it is confirmed or resolved, when.
    Condition: (
        "id",
        "code",
        "clinicalStatus",
        "verificationStatus",
        "bodySite",
        "onset[x]",
        "recordedDate",
        "stage",
    ),
    # observations.py (CEA from the raw JSON), context.py, staging.py, tumors.py, dates.py.
    Observation: (
        "id",
        "status",
        "code",
        "effective[x]",
        "issued",
        "value[x]",
        "component",
        "bodySite",
        "focus",
        "hasMember",
    ),
    # procedures.py, dates.py: what was done, where or why, when, and whether it was done.
    Procedure: ("id", "status", "code", "performed[x]", "bodySite", "reasonCode", "reasonReference"),
    ServiceRequest: (
        "id",
        "status",
        "code",
        "occurrence[x]",
        "authoredOn",
        "bodySite",
        "reasonCode",
        "reasonReference",
    ),
    # tumors.py: the lesion, where it is, and the Condition it belongs to.
    BodyStructure: ("id", "active", "location", "extension"),
    # therapy.py: the drug (a contained Medication too), and when therapy began.
    MedicationRequest: (*_MEDICATION, "authoredOn", "dosageInstruction"),
    MedicationAdministration: (*_MEDICATION, "effective[x]"),
    MedicationStatement: (*_MEDICATION, "effective[x]"),
}


def field_names(model: Any, elements: tuple[str, ...]) -> list[str]:
    """The model's field names for `elements`: every type of a choice element, and beside each
    primitive its `_name` extension field (which may stand in for a required value)."""
    fields = model.model_fields
    names: list[str] = []
    for element in elements:
        if element.endswith("[x]"):
            prefix = element[:-3]
            names += [
                n for n, f in fields.items() if (f.json_schema_extra or {}).get("one_of_many") == prefix
            ]
        else:
            names.append(element)
    for name in list(names):
        if f"{name}__ext" in fields:
            names.append(f"{name}__ext")
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(f"{model.__name__} has no element {missing}")
    return names


class _ReadModel(FHIRResourceModel):
    """A resource model trimmed to the elements the facts read. It keeps fhir.resources' own checks
    on those elements: no null in a list of elements, one type only of a choice element, a required
    element present (`read_required` and `read_choices` hold the model's rules for the kept elements)."""

    # Validated straight by pydantic: fhir.resources' own __init__ only checks a resourceType (never
    # among the elements read) and then validates again, running every model check twice.
    __init__ = BaseModel.__init__

    read_sequence: ClassVar[list[str]] = []
    read_required: ClassVar[list[tuple[str, str | None]]] = []
    read_choices: ClassVar[dict[str, list[str]]] = {}

    @classmethod
    def elements_sequence(cls) -> list[str]:
        return cls.read_sequence

    def get_required_fields(self) -> list[tuple[str, str | None]]:
        return self.read_required

    def get_one_of_many_fields(self) -> dict[str, list[str]]:
        return self.read_choices


def read_model(model: Any) -> Any:
    """`model` trimmed to READ[model]: a pydantic model of the same resource type whose fields are
    fhir.resources' own for those elements (same names, types, aliases, required-ness)."""
    names = field_names(model, READ[model])
    every = model.model_construct()  # only to ask the model for its rules, never returned
    kept = set(names)
    fields: dict[str, Any] = {n: (model.model_fields[n].annotation, model.model_fields[n]) for n in names}
    trimmed: Any = create_model(f"{model.__name__}Read", __base__=_ReadModel, __module__=__name__, **fields)
    trimmed.__resource_type__ = model.__resource_type__
    trimmed.read_sequence = [n for n in model.elements_sequence() if n in kept]
    trimmed.read_required = [(n, e) for n, e in every.get_required_fields() if n in kept]
    trimmed.read_choices = {p: f for p, f in every.get_one_of_many_fields().items() if set(f) <= kept}
    return trimmed


READ_MODELS: dict[Any, Any] = {model: read_model(model) for model in READ}
