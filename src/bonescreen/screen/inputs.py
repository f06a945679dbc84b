"""Inputs of a screening run: the file walk, manifests, file lists, the clinical table, labels.

Folders are walked lazily and sorted (every non-hidden file gets a row, so a
stray ``notes.txt`` shows up as ``not_dicom`` rather than vanishing);
manifests are ``.csv``/``.tsv`` files with a ``path`` column whose other
columns (image_id, site, sex, age, view, modality, patient_id, height_cm,
weight_kg, ...) fill facts a PNG/JPEG or a sparse DICOM header lacks (the
header wins where both exist).

Pediatric models also need height and weight: from the DICOM header
(PatientSize in metres, PatientWeight in kg), a screening manifest's
``height_cm``/``weight_kg`` columns, or a ``--clinical`` CSV
(:class:`ClinicalTable`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen import schema
from bonescreen.dates import optional_date
from bonescreen.errors import TableError
from bonescreen.screen.models import model_id
from bonescreen.walk import walk_files

__all__ = [
    "HEIGHT_CM_RANGE",
    "LABEL_COLUMNS",
    "PEDIATRIC_Z_COLUMN",
    "WEIGHT_KG_RANGE",
    "ClinicalTable",
    "InputItem",
    "clinical_inputs",
    "clinical_raw",
    "count_inputs",
    "fill_from_clinical",
    "fill_meta",
    "iter_inputs",
    "read_labels",
]

LABEL_COLUMNS = ("label", "label_stage1", "label_3class", "t_min", "severity", "split", "category")
PEDIATRIC_Z_COLUMN = "z_lumbar_spine"  # what the pediatric model regresses (bonescreen.pediatric.data)
PEDIATRIC_LABEL_COLUMNS = (PEDIATRIC_Z_COLUMN, "bmd_lumbar_spine")
MANIFEST_SUFFIXES = (".csv", ".tsv")
# Plausible ranges (bonescreen.schema, shared with the cohort's DXA checks); a value outside is
# treated as not recorded (e.g. PatientSize written in cm).
HEIGHT_CM_RANGE = schema.HEIGHT_CM_RANGE
WEIGHT_KG_RANGE = schema.WEIGHT_KG_RANGE


@dataclass
class InputItem:
    """One image to screen; ``extra`` holds its manifest row (site, sex, age, view, ...), if any."""

    path: str
    extra: dict[str, str] = field(default_factory=dict)


def _is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def _manifest_rows(path: Path) -> Iterator[InputItem]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    base = path.resolve().parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delim)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise TableError(f"{path}: a screening manifest needs a 'path' column; found {cols}")
        for raw in reader:
            row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            p = row.get("path", "")
            if not p:
                continue
            pp = Path(p)
            if not pp.is_absolute() and not pp.exists() and (base / pp).exists():
                pp = base / pp
            yield InputItem(str(pp), row)


def iter_inputs(inputs: Iterable[str | os.PathLike[str]], *, exclude: Iterable[str | os.PathLike[str]] = ()
                ) -> Iterator[InputItem]:
    """Files, folders (``bonescreen.walk.walk_files``: every file it picks gets a row, an image or not, so
    a non-image is a recorded skip) and manifests (.csv/.tsv with ``path``)."""
    ex = [os.path.realpath(e) for e in exclude]
    seen: set[str] = set()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            items: Iterator[InputItem] = (InputItem(str(f)) for f in walk_files(p, exclude=ex))
        elif _is_manifest(p):
            items = _manifest_rows(p)
        else:
            items = iter([InputItem(str(p))])
        for item in items:
            key = os.path.realpath(item.path)
            if key in seen:
                continue
            seen.add(key)
            yield item


def count_inputs(inputs: Iterable[str | os.PathLike[str]], *, exclude: Iterable[str | os.PathLike[str]] = ()) -> int:
    """A cheap first pass for the progress bar's total (no file is opened except manifests)."""
    return sum(1 for _ in iter_inputs(inputs, exclude=exclude))


def optional_float(value: Any) -> float | None:
    """A finite float, or None for empty / unreadable / NaN values."""
    if value is None:
        return None
    try:
        v = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def _in_range(value: float | None, lo_hi: tuple[float, float]) -> bool:
    return value is not None and lo_hi[0] <= value <= lo_hi[1]


class ClinicalTable:
    """``--clinical CSV``: height and weight (and age/sex where the header lacks them) per image.

    Keyed by ``image_id`` (the SOP Instance UID, or a manifest's image_id) or
    ``patient_id`` (the raw PatientID, matched before it is hashed). Columns:
    ``height_cm`` and/or ``weight_kg``, optional ``age``, ``sex`` and
    ``study_date``/``exam_date``. A patient with several rows gets the row
    whose date is nearest the image's study date; without dates the match is
    ambiguous and refused (the value is not guessed).
    """

    KEYS = ("image_id", "patient_id")
    VALUES = ("height_cm", "weight_kg")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.is_file():
            raise TableError(f"clinical table not found: {p}")
        self.path = p
        self.id = model_id(p)
        self.by_key: dict[str, dict[str, list[dict[str, str]]]] = {k: {} for k in self.KEYS}
        delim = "\t" if p.suffix.lower() == ".tsv" else ","
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delim)
            cols = {str(c).strip().lower() for c in (reader.fieldnames or [])}
            if not cols & set(self.KEYS) or not cols & set(self.VALUES):
                raise TableError(
                    f"{p}: a clinical table needs an image_id or patient_id column and height_cm and/or "
                    f"weight_kg; found {sorted(cols)}"
                )
            for raw in reader:
                row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
                for key in self.KEYS:
                    if row.get(key):
                        self.by_key[key].setdefault(row[key], []).append(row)

    def lookup(self, image_id: str | None, patient_id: str | None, study_date: Any = None
               ) -> tuple[dict[str, str] | None, str]:
        """(row, note): the matching row or None; ``note`` says why a match was refused."""
        for key, value in (("image_id", image_id), ("patient_id", patient_id)):
            rows = self.by_key[key].get(str(value)) if value else None
            if not rows:
                continue
            if len(rows) == 1:
                return rows[0], ""
            dated = [(d, r) for r in rows if (d := optional_date(r.get("study_date") or r.get("exam_date")))]
            if study_date is not None and len(dated) == len(rows):
                gaps = sorted((abs((d - study_date).days), i) for i, (d, _r) in enumerate(dated))
                if len(gaps) == 1 or gaps[0][0] < gaps[1][0]:
                    return dated[gaps[0][1]][1], ""
            return None, f"{len(rows)} rows in --clinical match this image's {key} and no date picks one"
        return None, ""


def header_body_size(path: str) -> tuple[float | None, float | None, list[str]]:
    """(height cm, weight kg, notes) from PatientSize (metres) and PatientWeight (kg).

    Read here, header only, because ``bonescreen.io.ImageMeta`` does not carry them.
    A value outside the plausible range (e.g. PatientSize written in centimetres, or
    the 0 some modalities store for "unknown") counts as not recorded.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSize", "PatientWeight"])
    except Exception:
        return None, None, []
    notes: list[str] = []
    size_m, weight = optional_float(ds.get("PatientSize")), optional_float(ds.get("PatientWeight"))
    height = None if size_m is None else round(size_m * 100.0, 2)
    if height is not None and not _in_range(height, HEIGHT_CM_RANGE):
        notes.append(f"PatientSize {size_m:g} m is implausible (metres expected); ignored")
        height = None
    if weight is not None and not _in_range(weight, WEIGHT_KG_RANGE):
        notes.append(f"PatientWeight {weight:g} kg is implausible; ignored")
        weight = None
    return height, weight, notes


def fill_from_clinical(meta: Any, row: Mapping[str, str] | None) -> None:
    """A --clinical row fills age/sex only where the header and manifest have none."""
    if not row:
        return
    if meta.age is None and optional_float(row.get("age")) is not None:
        meta.age = optional_float(row.get("age"))
    if meta.sex is None and row.get("sex"):
        s = row["sex"].strip().upper()[:1]
        meta.sex = s if s in ("F", "M", "O") else None


def clinical_inputs(item: InputItem, meta: Any, csv_row: Mapping[str, str] | None, csv_note: str
                     ) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """(model inputs, row columns, missing reason or '', message) for one pediatric image.

    Height and weight, per value: DICOM header, then the screening manifest's
    ``height_cm``/``weight_kg``, then the --clinical row.
    """
    from bonescreen.pediatric.model import missing_reason, sex_code

    notes: list[str] = []
    values: dict[str, float | None] = {"height_cm": None, "weight_kg": None}
    sources: list[str] = []
    if meta.source == "dicom":
        h, w, notes = header_body_size(item.path)
        values.update(height_cm=h, weight_kg=w)
        if h is not None or w is not None:
            sources.append("dicom")
    for name, table in (("manifest", item.extra), ("clinical_csv", csv_row or {})):
        used = False
        for key, rng in (("height_cm", HEIGHT_CM_RANGE), ("weight_kg", WEIGHT_KG_RANGE)):
            if values[key] is not None or not table.get(key):
                continue
            v = optional_float(table.get(key))
            if _in_range(v, rng):
                values[key], used = v, True
            else:
                notes.append(f"{key} {table.get(key)!r} from the {name.replace('_', ' ')} is implausible; ignored")
        if used:
            sources.append(name)
    if csv_note:
        notes.append(csv_note)
    clin = {"age": meta.age, "sex": meta.sex, **values}
    vec = np.array([np.nan if meta.age is None else float(meta.age), sex_code(meta.sex),
                    np.nan if values["height_cm"] is None else values["height_cm"],
                    np.nan if values["weight_kg"] is None else values["weight_kg"]], dtype=float)
    reason = missing_reason(vec)
    message = ""
    if reason:
        what = reason.split(":", 1)[1].replace("+", ", ")
        message = (f"the pediatric model needs {what}: not found in the DICOM header "
                   "(PatientAge/PatientSex/PatientSize/PatientWeight) or a clinical table")
    if notes:
        message = "; ".join([message, *notes]) if message else "; ".join(notes)
    cols = {"height_cm": values["height_cm"], "weight_kg": values["weight_kg"],
            "clinical_source": "+".join(sources) or None}
    return clin, cols, reason, message


def clinical_raw(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Raw clinical matrix ``(N, 4)`` (age, sex F=1/M=0, height cm, weight kg) for Grad-CAM."""
    import pandas as pd

    from bonescreen.pediatric.model import clinical_matrix

    return clinical_matrix(pd.DataFrame([dict(r) for r in rows], columns=["age", "sex", "height_cm", "weight_kg"]))


def fill_meta(meta: Any, extra: Mapping[str, str]) -> None:
    """Manifest values fill facts the header lacks (header wins where both exist)."""
    from bonescreen.io import normalise_view, parse_dicom_age

    if meta.age is None and extra.get("age"):
        meta.age = parse_dicom_age(extra["age"])
    if meta.view is None and extra.get("view"):
        meta.view = normalise_view(extra["view"])
    if meta.modality is None and extra.get("modality"):
        meta.modality = extra["modality"].upper()
    if meta.sex is None and extra.get("sex"):
        s = extra["sex"].strip().upper()[:1]
        meta.sex = s if s in ("F", "M", "O") else None
    if meta.patient_id is None and extra.get("patient_id"):
        meta.patient_id = extra["patient_id"]


def read_labels(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Reference labels from a cohort manifest: by image_id and by resolved path."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"labels file not found: {p}")
    by_id: dict[str, dict[str, str]] = {}
    by_path: dict[str, dict[str, str]] = {}
    base = p.resolve().parent
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not cols & {"image_id", "path"} or not cols & {"label", PEDIATRIC_Z_COLUMN}:
            raise TableError(f"{p}: a labels table needs 'label' (or, for pediatric models, "
                             f"'{PEDIATRIC_Z_COLUMN}') and 'image_id' or 'path' columns; found {sorted(cols)}")
        for row in reader:
            keep = {k: (row.get(k) or "") for k in (*LABEL_COLUMNS, *PEDIATRIC_LABEL_COLUMNS,
                                                    "patient_id", "site", "sex", "age")}
            if row.get("image_id"):
                by_id[row["image_id"]] = keep
            if row.get("path"):
                rp = Path(row["path"])
                by_path[os.path.realpath(rp if rp.is_absolute() or rp.exists() else base / rp)] = keep
    return by_id, by_path
