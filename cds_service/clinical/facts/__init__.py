"""FHIR chart → PatientFacts (derive.derive_facts), one module per resource family; the dataclasses
are in model.py and the one fhir.resources validation step in validation.py (of the elements
read_elements.py lists: the ones the facts read)."""
