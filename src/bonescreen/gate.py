"""Eligibility gate: which images a model may be run on, and a machine-readable reason if not.

A model trained on frontal adult CR/DX chest radiographs says nothing useful
about a lateral view, a child or a blank frame, so ``screen`` refuses those
images with a reason instead of scoring them. The header checks run on
:func:`bonescreen.io.read_dicom_meta` output, before any pixel is decoded; the
pixel checks run on the decoded image.

Reasons (the ``reason`` column of the screening table):

- ``wrong_modality`` — modality is not one of the model's (CR/DX by default);
- ``lateral_view`` — a lateral projection; ``not_frontal`` — another non-PA/AP view;
- ``age_out_of_range`` — outside the model's declared ``[min_age, max_age]``;
- ``age_unknown`` / ``view_unknown`` / ``modality_unknown`` — the fact is missing
  (no PatientAge/PatientBirthDate, no ViewPosition/view code, or a PNG/JPEG
  without a sidecar value). Policy: **refused by default** because the gate
  cannot show the image is in scope; ``allow_unknown`` (CLI
  ``--allow-unknown age,view,modality``) lets such images through;
- ``too_small`` — fewer than ``min_size`` pixels on the short side;
- ``blank`` — every pixel has the same value;
- ``low_dynamic_range`` — the central region (the part the preprocessing
  stretches) has fewer than ``min_levels`` distinct grey levels.

Reading errors keep the reason of the io error (``not_dicom``, ``no_pixel_data``,
``multi_frame``, ``no_decoder``, ``truncated``, ``corrupt``, ``unreadable``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from bonescreen.schema import FRONTAL_VIEWS

__all__ = [
    "GATE_REASONS",
    "UNKNOWN_FACTS",
    "GateDecision",
    "GatePolicy",
    "check_header",
    "check_pixels",
]

GATE_REASONS = (
    "wrong_modality",
    "lateral_view",
    "not_frontal",
    "age_out_of_range",
    "age_unknown",
    "view_unknown",
    "modality_unknown",
    "too_small",
    "blank",
    "low_dynamic_range",
)
UNKNOWN_FACTS = ("age", "view", "modality")
LATERAL_VIEWS = ("LAT", "LL", "RL", "LATERAL")


class MetaLike(Protocol):
    """The ImageMeta fields the gate reads (so tests can pass simple stand-ins)."""

    modality: str | None
    view: str | None
    age: float | None
    rows: int | None
    columns: int | None


@dataclass(frozen=True)
class GateDecision:
    eligible: bool
    reason: str = ""
    message: str = ""

    @classmethod
    def ok(cls) -> GateDecision:
        return cls(True)

    @classmethod
    def refuse(cls, reason: str, message: str) -> GateDecision:
        return cls(False, reason, message)


@dataclass(frozen=True)
class GatePolicy:
    """What a model accepts. Built from an artifact's ``eligibility`` dict plus CLI overrides."""

    modalities: tuple[str, ...] = ("CR", "DX")
    views: tuple[str, ...] = tuple(FRONTAL_VIEWS)
    min_age: float | None = 18.0
    max_age: float | None = None
    allow_unknown: frozenset[str] = field(default_factory=frozenset)
    min_size: int = 256
    min_levels: int = 16
    check_scope: bool = True  # False: only size/sanity (``explain --no-gate``)

    @classmethod
    def from_eligibility(cls, eligibility: Mapping[str, Any] | None, **overrides: Any) -> GatePolicy:
        """Artifact ``eligibility`` (modalities, views, min_age, max_age, ...) -> policy.

        A missing key keeps the adult default; ``overrides`` with value None are ignored.
        """
        base = cls()
        kw: dict[str, Any] = {}
        elig = dict(eligibility or {})
        if elig.get("modalities"):
            kw["modalities"] = tuple(str(m).upper() for m in elig["modalities"])
        if elig.get("views"):
            kw["views"] = tuple(str(v).upper() for v in elig["views"])
        for key in ("min_age", "max_age"):
            if key in elig:
                kw[key] = None if elig[key] is None else float(elig[key])
        for key in ("min_size", "min_levels"):
            if elig.get(key) is not None:
                kw[key] = int(elig[key])
        if elig.get("allow_unknown"):
            kw["allow_unknown"] = frozenset(elig["allow_unknown"])
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "allow_unknown":
                value = frozenset(_check_unknown(value))
            elif key in ("modalities", "views"):
                value = tuple(str(v).upper() for v in value)
            kw[key] = value
        return replace(base, **kw)

    def as_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities),
            "views": list(self.views),
            "min_age": self.min_age,
            "max_age": self.max_age,
            "allow_unknown": sorted(self.allow_unknown),
            "min_size": self.min_size,
            "min_levels": self.min_levels,
            "check_scope": self.check_scope,
        }


def _check_unknown(values: Iterable[str]) -> list[str]:
    out = [str(v).strip().lower() for v in values if str(v).strip()]
    bad = [v for v in out if v not in UNKNOWN_FACTS]
    if bad:
        raise ValueError(f"allow_unknown accepts {', '.join(UNKNOWN_FACTS)}; got {', '.join(bad)}")
    return out


def check_header(meta: MetaLike, policy: GatePolicy) -> GateDecision:
    """Modality, view, age and size from the header; cheap, no pixels needed."""
    if not policy.check_scope:
        return _check_size(meta, policy)
    modality = (meta.modality or "").strip().upper()
    if not modality:
        if "modality" not in policy.allow_unknown:
            return GateDecision.refuse("modality_unknown", "modality is not recorded")
    elif modality not in policy.modalities:
        return GateDecision.refuse(
            "wrong_modality", f"modality {modality} is not one of {', '.join(policy.modalities)}"
        )

    view = (meta.view or "").strip().upper()
    if not view:
        if "view" not in policy.allow_unknown:
            return GateDecision.refuse("view_unknown", "view position is not recorded")
    elif view not in policy.views:
        if view in LATERAL_VIEWS:
            return GateDecision.refuse("lateral_view", "lateral view; the model reads frontal views")
        return GateDecision.refuse("not_frontal", f"view {view} is not one of {', '.join(policy.views)}")

    age = meta.age
    if age is None or (isinstance(age, float) and np.isnan(age)):
        if "age" not in policy.allow_unknown:
            return GateDecision.refuse("age_unknown", "patient age is not recorded")
    else:
        lo = policy.min_age if policy.min_age is not None else -np.inf
        hi = policy.max_age if policy.max_age is not None else np.inf
        if not lo <= float(age) <= hi:
            return GateDecision.refuse(
                "age_out_of_range", f"age {float(age):.0f} outside the model's range {_range(policy)}"
            )

    return _check_size(meta, policy)


def _check_size(meta: MetaLike, policy: GatePolicy) -> GateDecision:
    if meta.rows and meta.columns and min(int(meta.rows), int(meta.columns)) < policy.min_size:
        return GateDecision.refuse(
            "too_small", f"{meta.rows}x{meta.columns} pixels; at least {policy.min_size} per side needed"
        )
    return GateDecision.ok()


def _range(policy: GatePolicy) -> str:
    lo = "-" if policy.min_age is None else f"{policy.min_age:g}"
    hi = "-" if policy.max_age is None else f"{policy.max_age:g}"
    return f"[{lo}, {hi}] years"


def check_pixels(image: np.ndarray, policy: GatePolicy) -> GateDecision:
    """Image sanity on the decoded (bone-bright float) image."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        return GateDecision.refuse("unsupported_image", f"image has shape {arr.shape}; expected 2-D")
    h, w = arr.shape
    if min(h, w) < policy.min_size:
        return GateDecision.refuse(
            "too_small", f"{h}x{w} pixels; at least {policy.min_size} per side needed"
        )
    finite = np.isfinite(arr)
    if not finite.any():
        return GateDecision.refuse("blank", "no finite pixel values")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return GateDecision.refuse("blank", "every pixel has the same value")
    # The preprocessing stretches the central region's range to 0..255, so that
    # region must hold real contrast; a stride keeps this cheap on 3k x 3k images.
    centre = arr[h // 4 : (3 * h) // 4, w // 4 : (3 * w) // 4]
    step = max(1, int(np.sqrt(centre.size / 250_000)))
    sample = centre[::step, ::step]
    sample = sample[np.isfinite(sample)]
    levels = int(np.unique(sample).size)
    if levels < policy.min_levels:
        return GateDecision.refuse(
            "low_dynamic_range",
            f"central region has {levels} grey level(s); at least {policy.min_levels} needed",
        )
    return GateDecision.ok()
