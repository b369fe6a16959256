"""Model parameters from mappings/models.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import yaml

from cds_service.paths import data_dir


@dataclass(frozen=True)
class LungParams:
    model: str
    cea_threshold_ng_ml: float
    dfi_limit_months: float
    synchronous_within_months: float
    max_extrapulmonary_organs: int
    ablation_lesion_risk_cm: float
    groups: dict[str, tuple[int, int]]


@cache
def lung_params() -> LungParams:
    raw = dict(_models()["lung"])
    raw["groups"] = {name: (int(lo), int(hi)) for name, (lo, hi) in raw["groups"].items()}
    return LungParams(**raw)


@dataclass(frozen=True)
class LiverParams:
    model: str
    cea_threshold_ng_ml: float
    dfi_limit_months: float
    largest_lesion_limit_cm: float
    max_other_organs: int
    groups: dict[str, tuple[int, int]]


@cache
def _models() -> dict:
    return yaml.safe_load((data_dir("mappings") / "models.yaml").read_text(encoding="utf-8"))


@cache
def liver_params() -> LiverParams:
    raw = dict(_models()["liver"])
    raw["groups"] = {name: (int(lo), int(hi)) for name, (lo, hi) in raw["groups"].items()}
    return LiverParams(**raw)


def group_of(score_min: int, score_max: int, groups: dict[str, tuple[int, int]]) -> str:
    """The group both ends of the score range fall in, or `undetermined` when they differ."""

    def find(score: int) -> str | None:
        return next((name for name, (lo, hi) in groups.items() if lo <= score <= hi), None)

    low, high = find(score_min), find(score_max)
    return low if low is not None and low == high else "undetermined"
