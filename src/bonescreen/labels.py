"""WHO categories, severity grades and the per-stage training labels.

WHO (as in the OsPenScreen paper): the lowest T-score of lumbar spine, femoral
neck and total hip decides. normal T >= -1.0; low bone mass -2.5 < T < -1.0,
graded mild (-1.5 < T < -1.0), moderate (-2.0 < T <= -1.5), advanced
(-2.5 < T <= -2.0); osteoporosis T <= -2.5. Pediatric low BMD: Z <= -2.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from bonescreen.schema import CATEGORIES, T_SCORE_COLUMNS

NORMAL_MIN_T = -1.0
OSTEOPOROSIS_MAX_T = -2.5
MODERATE_MAX_T = -1.5
ADVANCED_MAX_T = -2.0
PEDIATRIC_LOW_Z = -2.0

# T-scores are reported to one or two decimals; rounding before comparing keeps
# values such as -1.0000000001 (float noise from unit conversions) on the
# boundary the report says they are on.
_DECIMALS = 6

CATEGORY_ALIASES = {
    "normal": "normal",
    "norm": "normal",
    "low_bone_mass": "low_bone_mass",
    "low bone mass": "low_bone_mass",
    "low-bone-mass": "low_bone_mass",
    "lbm": "low_bone_mass",
    "low_bmd": "low_bone_mass",
    "osteopenia": "low_bone_mass",
    "osteoporosis": "osteoporosis",
    "op": "osteoporosis",
}


_SEX_CODES = {
    "f": "F", "female": "F", "w": "F", "woman": "F",
    "m": "M", "male": "M", "man": "M",
    "o": "O", "other": "O",
    # ISO 5218 numeric codes, common in DXA exports (never in DICOM PatientSex)
    "1": "M", "2": "F",
}


def normalize_sex(value: object) -> str | None:
    """'F', 'M' or 'O' from DICOM PatientSex, DXA exports and prediction tables; None if unknown."""
    if value is None:
        return None
    return _SEX_CODES.get(str(value).strip().lower())


def _round(t: float) -> float:
    return round(float(t), _DECIMALS)


def lowest_t(scores: Iterable[float | None]) -> float:
    """Lowest available T-score; NaN when none is available."""
    vals = [float(s) for s in scores if s is not None and not _isnan(s)]
    return min(vals) if vals else math.nan


def _isnan(x: object) -> bool:
    try:
        return math.isnan(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def who_category(t_min: float) -> str | None:
    """WHO category from the lowest T-score; None when it is missing."""
    if t_min is None or _isnan(t_min):
        return None
    t = _round(t_min)
    if t >= NORMAL_MIN_T:
        return "normal"
    if t <= OSTEOPOROSIS_MAX_T:
        return "osteoporosis"
    return "low_bone_mass"


def severity(t_min: float) -> str | None:
    """normal / mild / moderate / advanced / osteoporosis; None when T is missing."""
    cat = who_category(t_min)
    if cat != "low_bone_mass":
        return cat
    t = _round(t_min)
    if t > MODERATE_MAX_T:
        return "mild"
    if t > ADVANCED_MAX_T:
        return "moderate"
    return "advanced"


def normalize_category(value: object) -> str | None:
    """Map an institutional category label onto the WHO vocabulary; None when empty.

    Raises ValueError for a label that is present but unknown, so a typo never
    becomes a silent 'normal'.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text in CATEGORY_ALIASES:
        return CATEGORY_ALIASES[text]
    raise ValueError(f"unknown category {value!r}; expected one of {CATEGORIES}")


def stage1_label(category: str | None) -> int | None:
    """Stage 1: osteoporosis (1) vs not (0)."""
    if category is None:
        return None
    return int(category == "osteoporosis")


def stage2_label(category: str | None) -> int | None:
    """Stage 2: low bone mass (1) vs normal (0); None for osteoporosis (excluded)."""
    if category in (None, "osteoporosis"):
        return None
    return int(category == "low_bone_mass")


def three_class_label(category: str | None) -> int | None:
    return None if category is None else CATEGORIES.index(category)


def pediatric_low_bmd(z: float) -> bool | None:
    """Pediatric low BMD: Z-score <= -2.0; None when Z is missing."""
    if z is None or _isnan(z):
        return None
    return _round(z) <= PEDIATRIC_LOW_Z


def add_labels(df: pd.DataFrame, t_columns: list[str] | None = None) -> pd.DataFrame:
    """Add t_min, category, severity and the three label columns to a DXA-like table.

    Rows with T-scores get the WHO category from them; rows without T-scores
    keep their institutional ``category`` (already normalised) and get no
    severity, as in the paper's category-only external sites.
    """
    cols = [c for c in (t_columns or T_SCORE_COLUMNS) if c in df.columns]
    out = df.copy()
    if cols:
        out["t_min"] = out[cols].astype(float).min(axis=1, skipna=True)
    else:
        out["t_min"] = np.nan
    given = out["category"] if "category" in out.columns else pd.Series(None, index=out.index)
    cats = [
        who_category(t) if not _isnan(t) else g
        for t, g in zip(out["t_min"], given.where(given.notna(), None))
    ]
    out["category"] = cats
    out["severity"] = [severity(t) if not _isnan(t) else None for t in out["t_min"]]
    out["label"] = pd.array([stage2_label(c) for c in cats], dtype="Int64")
    out["label_stage1"] = pd.array([stage1_label(c) for c in cats], dtype="Int64")
    out["label_3class"] = pd.array([three_class_label(c) for c in cats], dtype="Int64")
    return out
