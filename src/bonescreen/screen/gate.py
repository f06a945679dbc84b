"""Eligibility gate: which images a model may be run on, and a machine-readable reason if not.

A model trained on frontal adult CR/DX chest radiographs says nothing useful
about a lateral view, a child or a blank frame, so ``screen`` refuses those
images with a reason instead of scoring them. The header checks run on
:func:`bonescreen.io.read_dicom_meta` output, before any pixel is decoded; the
pixel checks run on the decoded image.

Reasons (the ``reason`` column of the screening table):

- ``wrong_modality`` — modality is not one of the model's (CR/DX by default);
- ``wrong_body_part`` — a header field names a region that is not the chest
  (BodyPartExamined ``KNEE``, AnatomicRegionSequence SCT 72696002, ProtocolName
  ``HAND PA``, SeriesDescription ``RX RODILLA``, ...); the message names the
  field and its value. See :func:`classify_anatomy` for the vocabulary and the
  rule when fields disagree;
- ``body_part_unknown`` — no field names the region, and the policy asks for it
  (``require_body_part``; by default such images go on to the content checks);
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
  stretches) has fewer than ``min_levels`` distinct grey levels;
- ``no_lung_fields`` — no dark lung field either side of a brighter mediastinum
  (:func:`lung_fields`, model-free; ``lung_fields=False`` turns it off).

The model-dependent content check (``out_of_distribution``) runs on the model's
features in the engine (bonescreen.ood), after these.

Reading errors keep the reason of the io error (``not_dicom``, ``no_pixel_data``,
``multi_frame``, ``no_decoder``, ``truncated``, ``corrupt``, ``unreadable``, ...).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from bonescreen.schema import (
    ANATOMY_FIELDS,
    CHEST_CODES,
    CHEST_SUBSTRINGS,
    CHEST_TERMS,
    FRONTAL_VIEWS,
    GATE_REASONS,
    LATERAL_VIEWS,
    NEUTRAL_ANATOMY_TERMS,
    NEUTRAL_CODES,
    NON_CHEST_CODES,
    NON_CHEST_TERMS,
    STUDY_ANATOMY_FIELDS,
)

__all__ = [
    "GATE_REASONS",
    "UNKNOWN_FACTS",
    "AnatomyVerdict",
    "GateDecision",
    "GatePolicy",
    "check_header",
    "check_pixels",
    "classify_anatomy",
    "classify_text",
]

UNKNOWN_FACTS = ("age", "view", "modality")


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
    def ok(cls, note: str = "") -> GateDecision:
        """Eligible; ``note`` (e.g. disagreeing anatomy fields) goes into the row's message."""
        return cls(True, "", note)

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
    # anatomy: refuse images whose header names no region (default: the content checks decide)
    require_body_part: bool = False
    # model-free content check: two lung fields either side of the mediastinum (lung_fields)
    lung_fields: bool = True

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
        if elig.get("require_body_part") is not None:
            kw["require_body_part"] = bool(elig["require_body_part"])
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
            "require_body_part": self.require_body_part,
            "lung_fields": self.lung_fields,
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

    anatomy = classify_anatomy(meta)
    if anatomy.kind == "non_chest":
        return GateDecision.refuse(
            "wrong_body_part",
            f"{anatomy.field} {anatomy.value!r} names the {anatomy.group}, not the chest{anatomy.note}",
        )
    if anatomy.kind == "unknown" and policy.require_body_part:
        return GateDecision.refuse(
            "body_part_unknown",
            "no header field (" + ", ".join((*ANATOMY_FIELDS, *STUDY_ANATOMY_FIELDS))
            + ") names the imaged region, and the policy requires one",
        )
    note = anatomy.note.lstrip("; ") if anatomy.kind == "chest" else ""

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

    size = _check_size(meta, policy)
    return size if not size.eligible or not note else GateDecision.ok(note)


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
    if policy.lung_fields and policy.check_scope:
        present, detail = lung_fields(arr)
        if not present:
            return GateDecision.refuse("no_lung_fields", f"no lung field on each side of the mediastinum: {detail}")
    return GateDecision.ok()


# --------------------------------------------------------------------------
# Anatomy from the header
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AnatomyVerdict:
    """What the header says was imaged: ``kind`` chest | non_chest | unknown, and which field said it."""

    kind: str
    field: str = ""
    value: str = ""
    group: str = ""  # non-chest region group (schema.NON_CHEST_TERMS key), or "chest"
    note: str = ""  # "; SeriesDescription 'KNEE' disagrees" when a later field names another region


def _fold(text: str) -> str:
    """Accents folded (NFKD, combining marks dropped) and upper-cased (``ß`` -> ``SS``)."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


_TOKEN = re.compile(r"[^\W_]+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(_fold(text))


@lru_cache(maxsize=1)
def _term_index() -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
    """first token -> [(term tokens, kind, group)], longest terms first."""
    index: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
    entries: list[tuple[str, str, str]] = [(t, "chest", "chest") for t in CHEST_TERMS]
    entries += [(t, "non_chest", group) for group, terms in NON_CHEST_TERMS.items() for t in terms]
    entries += [(t, "neutral", "") for t in NEUTRAL_ANATOMY_TERMS]
    for term, kind, group in entries:
        toks = tuple(_tokens(term))
        if toks:
            index.setdefault(toks[0], []).append((toks, kind, group))
    for lst in index.values():
        lst.sort(key=lambda e: -len(e[0]))
    return index


def _lookup(tok: str) -> list[tuple[tuple[str, ...], str, str]]:
    index = _term_index()
    found = index.get(tok)
    if found is None and len(tok) > 3 and tok.endswith("S"):  # plural: LUNGS, KNEES
        found = index.get(tok[:-1])
    return found or []


def classify_text(text: str | None) -> tuple[str, str]:
    """(kind, group) of one free-text field: chest | non_chest | neutral | unknown.

    A field that names the chest is ``chest`` even when it also names another
    region ("THORAX + ABDOMEN"): it may be a chest image, and the content
    checks decide. A field naming only non-chest regions is ``non_chest``.
    """
    if not text or not str(text).strip():
        return "unknown", ""
    composed = unicodedata.normalize("NFC", str(text))  # NFKD would split Hangul into jamo
    if any(sub in composed for sub in CHEST_SUBSTRINGS):
        return "chest", "chest"
    toks = _tokens(str(text))
    kinds: dict[str, str] = {}
    i = 0
    while i < len(toks):
        step = 1
        for term, kind, group in _lookup(toks[i]):
            n = len(term)
            window = tuple(toks[i:i + n])
            if window == term or (n == 1 and window and _lookup(window[0]) and window[0][:-1] == term[0]):
                kinds.setdefault(kind, group)
                step = n
                break
        i += step
    for kind in ("chest", "non_chest", "neutral"):
        if kind in kinds:
            return kind, kinds[kind]
    return "unknown", ""


def _classify_code(code: str | None, meaning: str | None) -> tuple[str, str]:
    if code:
        c = code.strip()
        if c in CHEST_CODES:
            return "chest", "chest"
        if c in NON_CHEST_CODES:
            return "non_chest", NON_CHEST_CODES[c].lower()
        if c in NEUTRAL_CODES:
            return "neutral", ""
    return classify_text(meaning)


def classify_anatomy(meta: Any) -> AnatomyVerdict:
    """What the header says was imaged.

    Fields, most authoritative first: AnatomicRegionSequence (code, else its
    meaning), BodyPartExamined, ProtocolName, SeriesDescription; then
    StudyDescription, which describes the whole study (it may list other exams)
    and is read only when none of the others names a region. **The first field
    that names a region decides**; a later field that names another region is
    noted in the message but does not overrule it (a technologist's protocol
    choice outranks free text; a mislabelled chest is still checked on its
    pixels by the OOD check). No field naming a region: ``unknown``.
    """
    region_code = getattr(meta, "anatomic_region_code", None)
    region_meaning = getattr(meta, "anatomic_region_meaning", None)
    fields: list[tuple[str, str, tuple[str, str]]] = []
    if region_code or region_meaning:
        shown = " ".join(x for x in (region_code, f"({region_meaning})" if region_meaning else "") if x)
        fields.append(("AnatomicRegionSequence", shown, _classify_code(region_code, region_meaning)))
    for name, attr in (("BodyPartExamined", "body_part"), ("ProtocolName", "protocol_name"),
                       ("SeriesDescription", "series_description"), ("StudyDescription", "study_description")):
        value = getattr(meta, attr, None)
        if value:
            fields.append((name, str(value), classify_text(str(value))))
    image_level = [f for f in fields if f[0] != "StudyDescription"]
    decided = next((f for f in image_level if f[2][0] in ("chest", "non_chest")), None)
    if decided is None:
        decided = next((f for f in fields if f[0] == "StudyDescription" and f[2][0] in ("chest", "non_chest")),
                       None)
    if decided is None:
        return AnatomyVerdict("unknown")
    kind, group = decided[2]
    others = [f for f in image_level if f is not decided and f[2][0] in ("chest", "non_chest") and f[2][0] != kind]
    note = "".join(f"; {f[0]} {f[1]!r} names {'the chest' if f[2][0] == 'chest' else 'the ' + f[2][1]} "
                   f"(the {decided[0]} decides)" for f in others)
    return AnatomyVerdict(kind, decided[0], decided[1], group, note)


# --------------------------------------------------------------------------
# Model-free content check: two lung fields
# --------------------------------------------------------------------------

LUNG_GRID = 64  # the image is judged at 64 x 64: coarse anatomy only, cheap on any size
LUNG_MIN_CONTRAST = 0.08  # mediastinum brighter than the darker-lung minimum, in the stretched 0..1 range


def lung_fields(image: np.ndarray) -> tuple[bool, str]:
    """Does the image show two dark lung fields either side of a brighter mediastinum?

    On a frontal chest radiograph (bone bright), the mid-zone column profile
    (rows 30-70 %) has a maximum near the midline (spine and mediastinum) and
    a minimum on each side (air in the lungs). The image is shrunk to 64 x 64,
    stretched between the 1st and 99th percentile of its central region (as the
    preprocessing does), and the profile smoothed; the check asks for
    ``max(centre) - max(min(left), min(right)) >= LUNG_MIN_CONTRAST``. Noise,
    gradients, documents and most non-chest images have no such profile.
    Returns (present, detail).
    """
    import cv2

    a = np.asarray(image, dtype=np.float32)
    if a.ndim != 2 or min(a.shape) < 8:
        return False, "not a 2-D image"
    a = np.nan_to_num(a, nan=float(np.nanmin(a)) if np.isfinite(a).any() else 0.0)
    g = cv2.resize(a, (LUNG_GRID, LUNG_GRID), interpolation=cv2.INTER_AREA)
    c = g[LUNG_GRID // 4: 3 * LUNG_GRID // 4, LUNG_GRID // 4: 3 * LUNG_GRID // 4]
    lo, hi = np.percentile(c, 1), np.percentile(c, 99)
    if hi <= lo:
        return False, "no contrast"
    g = np.clip((g - lo) / (hi - lo), 0.0, 1.0)
    prof = g[int(0.3 * LUNG_GRID): int(0.7 * LUNG_GRID)].mean(axis=0)
    prof = np.convolve(prof, np.ones(5) / 5, mode="same")
    n = LUNG_GRID
    centre = float(prof[int(0.4 * n): int(0.6 * n)].max())
    left = float(prof[int(0.08 * n): int(0.42 * n)].min())
    right = float(prof[int(0.58 * n): int(0.92 * n)].min())
    contrast = centre - max(left, right)
    ok = contrast >= LUNG_MIN_CONTRAST
    return ok, f"mediastinum-to-lung contrast {contrast:.2f} (at least {LUNG_MIN_CONTRAST:.2f} expected)"
