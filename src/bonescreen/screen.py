"""Screening: images in, one results row per image out (score, category, flag, or a reason).

Pipeline, built so memory stays flat over any number of images:

    lazy file walk -> small thread pool (header gate, decode, pixel gate,
    preprocess; bounded number in flight) -> batches -> model(s) -> rows

Rows go to ``results.jsonl`` (the journal) and ``results.csv`` after every
batch, flushed and fsync'ed. A re-run over the same output folder reads the
journal, drops a partially written last line (a run killed mid-write),
rewrites the CSV from the journal, and skips every image that already has a
row. ``predictions.csv`` (the ``evaluate`` schema) and ``summary.json`` are
rewritten at the end of each run.

Two-stage cascade (the paper's deployment): the stage-1 model flags
osteoporosis; the stage-2 model splits the rest into normal vs low bone mass.
A three-class model gives the category by arg-max. ``score`` in the table is
always P(low bone mass | not osteoporosis), the quantity the stage-2 label
(``label`` in the cohort manifest) measures, so ``bonescreen evaluate`` can
read ``predictions.csv`` directly once labels are joined (``labels=``).

Pediatric models (task ``pediatric``) regress the BMD Z-score from the image
plus age, sex, height and weight: height and weight come from the DICOM
header (PatientSize in metres, PatientWeight in kg), a screening manifest's
``height_cm``/``weight_kg`` columns, or a ``--clinical`` CSV; the category is
``low_bmd`` (predicted Z <= -2.0) or ``normal_bmd``, ``score`` is
P(Z <= -2.0), and ``pred_z``/``pred_bmd`` are extra columns. An image whose
clinical inputs are incomplete is skipped with ``missing_clinical:<names>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bonescreen import __version__
from bonescreen.errors import BonescreenError, ModelArtifactError, TableError
from bonescreen.gate import GateDecision, GatePolicy, check_header, check_pixels
from bonescreen.pseudonym import Pseudonymiser, key_fingerprint, load_or_create_key
from bonescreen.schema import PREDICTION_OPTIONAL, PREDICTION_REQUIRED

__all__ = [
    "PEDIATRIC_CATEGORIES",
    "PEDIATRIC_PREDICTION_COLUMNS",
    "PEDIATRIC_RESULT_COLUMNS",
    "PREDICTION_COLUMNS",
    "RESULT_COLUMNS",
    "ClinicalTable",
    "InputItem",
    "ModelSet",
    "ResultStore",
    "ScreenError",
    "ScreenOptions",
    "ScreenSummary",
    "decide",
    "decide_pediatric",
    "iter_inputs",
    "load_models",
    "model_id",
    "prediction_columns",
    "result_columns",
    "screen",
]

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "path",
    "image_id",
    "eligible",
    "reason",
    "message",
    "site",
    "sex",
    "age",
    "view",
    "modality",
    "study_date",
    "patient_id",
    "score",
    "score_stage1",
    "score_stage2",
    "p_normal",
    "p_low_bone_mass",
    "p_osteoporosis",
    "category",
    "flag",
    "threshold_stage1",
    "threshold_stage2",
    "model",
    "model_stage1",
    "backend",
    "bonescreen_version",
    "overlay",
    "sr",
    "sc",
]
#: What ``predictions.csv`` holds: ``schema.PREDICTION_*`` plus the screening extras.
PREDICTION_COLUMNS = [
    *PREDICTION_REQUIRED,
    *PREDICTION_OPTIONAL,
    "score_stage1",
    "label_stage1",
    "category",
    "flag",
    "path",
]
LABEL_COLUMNS = ("label", "label_stage1", "label_3class", "t_min", "severity", "split", "category")
PEDIATRIC_Z_COLUMN = "z_lumbar_spine"  # what the pediatric model regresses (bonescreen.pediatric.data)
PEDIATRIC_LABEL_COLUMNS = (PEDIATRIC_Z_COLUMN, "bmd_lumbar_spine")
MANIFEST_SUFFIXES = (".csv", ".tsv")

#: Pediatric categories: predicted Z <= -2.0 (the study's low BMD for age) or not. Named apart
#: from the adult WHO categories on purpose: a child's low Z-score is not "osteopenia".
PEDIATRIC_CATEGORIES = ("normal_bmd", "low_bmd")
#: Added to the results table for pediatric models (adult tables keep ``RESULT_COLUMNS``).
PEDIATRIC_RESULT_COLUMNS = ["pred_z", "pred_bmd", "height_cm", "weight_kg", "clinical_source"]
#: Added to ``predictions.csv`` for pediatric models; ``z_pred/bmd_pred/z_true/bmd_true`` are the
#: names ``bonescreen pediatric evaluate`` reads (``z_pred`` repeats ``pred_z``).
PEDIATRIC_PREDICTION_COLUMNS = ["pred_z", "pred_bmd", "z_pred", "bmd_pred", "z_true", "bmd_true",
                                "height_cm", "weight_kg"]
# Plausible ranges; a value outside is treated as not recorded (e.g. PatientSize written in cm).
HEIGHT_CM_RANGE = (30.0, 250.0)
WEIGHT_KG_RANGE = (0.5, 350.0)


def result_columns(mode: str) -> list[str]:
    """The results-table columns of a run in ``mode`` (``ModelSet.mode``)."""
    return RESULT_COLUMNS + PEDIATRIC_RESULT_COLUMNS if mode == "pediatric" else list(RESULT_COLUMNS)


def prediction_columns(mode: str) -> list[str]:
    """The ``predictions.csv`` columns of a run in ``mode``."""
    return PREDICTION_COLUMNS + PEDIATRIC_PREDICTION_COLUMNS if mode == "pediatric" else list(PREDICTION_COLUMNS)


PEDIATRIC_CASCADE_REFUSED = (
    "a pediatric model cannot run in the two-stage cascade (--stage1 is the adult osteoporosis model, "
    "and its eligibility excludes children); screen with --model pediatric.pt alone"
)


class ScreenError(BonescreenError):
    """The run as a whole cannot proceed (bad options, output folder from another model, ...)."""

    reason = "screen_error"


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class Predictor(Protocol):
    """LoadedModel (torch) and OnnxModel (onnxruntime) both fit this."""

    spec: Any
    path: Any

    @property
    def size(self) -> int: ...

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_id(path: str | os.PathLike[str]) -> str:
    """``<file name>@<sha256 prefix>``: names the exact weights a row came from."""
    return f"{Path(path).name}@{file_sha256(path)[:12]}"


@dataclass
class ModelSet:
    """The model(s) a run uses: ``main`` (stage2, three_class or stage1) and an optional ``stage1``."""

    main: Predictor
    stage1: Predictor | None = None
    main_id: str = ""
    stage1_id: str = ""
    backend: str = "torch"
    # torch modules for Grad-CAM (None when only an ONNX file was given)
    main_torch: Any = None
    stage1_torch: Any = None

    def __post_init__(self) -> None:
        task = self.main.spec.task
        if task not in ("stage2", "three_class", "stage1", "pediatric"):
            raise ModelArtifactError(
                f"a {task!r} model cannot screen; expected a stage2, three_class, stage1 or pediatric model"
            )
        if task == "pediatric" and self.stage1 is not None:
            raise ModelArtifactError(PEDIATRIC_CASCADE_REFUSED)
        if self.stage1 is not None:
            if self.stage1.spec.task != "stage1":
                raise ModelArtifactError(
                    f"--stage1 must be a 'stage1' (osteoporosis) model, got a {self.stage1.spec.task!r} model"
                )
            if task != "stage2":
                raise ModelArtifactError(
                    f"the cascade runs a stage-2 model after the stage-1 model; --model is a {task!r} model"
                )

    @property
    def mode(self) -> str:
        if self.stage1 is not None:
            return "cascade"
        return str(self.main.spec.task)

    @property
    def pediatric(self) -> bool:
        return self.main.spec.task == "pediatric"

    @property
    def sizes(self) -> list[int]:
        sizes = {int(self.main.size)}
        if self.stage1 is not None:
            sizes.add(int(self.stage1.size))
        return sorted(sizes)


def _load_one(path: str | os.PathLike[str], backend: str, threads: int | None, cache_dir: Path | None,
              expected_task: str | None) -> tuple[Predictor, Any, str]:
    """(predictor, torch LoadedModel or None, model id)."""
    from bonescreen.artifact import load_artifact

    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model not found: {path}")
    mid = model_id(path)
    if path.suffix.lower() == ".onnx":
        if backend != "onnx":
            raise ModelArtifactError(f"{path.name} is an ONNX file; pass --backend onnx (or the .pt artifact)")
        from bonescreen.onnx_export import load_onnx

        onnx_model = load_onnx(path, expected_task=expected_task, threads=threads)
        _refuse_pediatric_onnx(onnx_model.spec.task, path)
        return onnx_model, None, mid
    loaded = load_artifact(path, expected_task=expected_task)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if backend == "torch":
        return loaded, loaded, mid
    if backend == "torch-bf16":
        if loaded.spec.task == "pediatric":
            raise ModelArtifactError(f"{path.name} is a pediatric model: screen it with --backend torch")
        return Bf16Predictor(loaded), loaded, mid
    if backend != "onnx":
        raise ScreenError(f"backend must be 'torch', 'torch-bf16' or 'onnx', got {backend!r}")
    _refuse_pediatric_onnx(loaded.spec.task, path)
    from bonescreen.onnx_export import export_onnx, load_onnx

    cache = cache_dir or path.parent
    onnx_path = cache / f"{path.stem}.{mid.rsplit('@', 1)[1]}.onnx"
    if not onnx_path.is_file():
        log.info("exporting %s to ONNX (%s)", path.name, onnx_path)
        export_onnx(loaded, onnx_path, source_id=mid)
    return load_onnx(onnx_path, threads=threads), loaded, mid


class Bf16Predictor:
    """A LoadedModel run under CPU bf16 autocast.

    The fast CPU path that keeps accuracy: on this project's AVX-512-BF16 build machine it ran
    1.8-2.0x eager fp32 for convnext_small at 512 px, and changed the demo student's AUC by
    +0.001, where onnxruntime int8 lost 0.005-0.008 (bench/bench_screen.py; README Benchmarks).
    """

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.path = loaded.path

    @property
    def size(self) -> int:
        return int(self.loaded.size)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.loaded.predict_proba(images)


def _refuse_pediatric_onnx(task: str, path: Path) -> None:
    if task == "pediatric":
        raise ModelArtifactError(
            f"{path.name} is a pediatric model: it takes the image and the clinical variables (two inputs) "
            "and has no ONNX export; screen it with --backend torch"
        )


def load_models(
    model: str | os.PathLike[str],
    stage1: str | os.PathLike[str] | None = None,
    *,
    backend: str = "torch",
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelSet:
    """Load the model(s); ``backend="onnx"`` exports a .pt artifact to ONNX once (cached) and runs it."""
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    main, main_t, main_id = _load_one(model, backend, threads, cache, None)
    s1 = s1_t = None
    s1_id = ""
    if stage1 is not None and main.spec.task == "pediatric":
        raise ModelArtifactError(PEDIATRIC_CASCADE_REFUSED)
    if stage1 is not None:
        s1, s1_t, s1_id = _load_one(stage1, backend, threads, cache, "stage1")
    return ModelSet(main, s1, main_id, s1_id, backend, main_t, s1_t)


# --------------------------------------------------------------------------
# Decision: probabilities -> scores, category, flag
# --------------------------------------------------------------------------


def _pos(p: Predictor) -> int:
    return int(p.spec.positive_class)


def decide(
    mode: str,
    probs_main: np.ndarray | None,
    probs_stage1: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    threshold_stage1: float = 0.5,
    positive: int = 1,
    positive_stage1: int = 1,
    class_names: Sequence[str] = ("normal", "low_bone_mass", "osteoporosis"),
) -> list[dict[str, Any]]:
    """Per-image score columns, category and flag from model probabilities (pure; easy to test).

    ``cascade``: stage-1 score >= ``threshold_stage1`` -> osteoporosis; otherwise
    stage-2 score >= ``threshold`` -> low bone mass, else normal. Rows the
    stage-1 model flags may have ``probs_main`` NaN (stage 2 was not run).
    ``stage2``: low bone mass / normal. ``stage1``: osteoporosis / not_osteoporosis.
    ``three_class``: arg-max over (normal, low bone mass, osteoporosis).
    """
    out: list[dict[str, Any]] = []
    n = len(probs_main) if probs_main is not None else len(probs_stage1)  # type: ignore[arg-type]
    for i in range(n):
        row: dict[str, Any] = {
            "score": None, "score_stage1": None, "score_stage2": None,
            "p_normal": None, "p_low_bone_mass": None, "p_osteoporosis": None,
        }
        if mode == "three_class":
            p = np.asarray(probs_main[i], dtype=np.float64)  # type: ignore[index]
            idx = {name: k for k, name in enumerate(class_names)}
            pn, pl, po = (float(p[idx[c]]) for c in ("normal", "low_bone_mass", "osteoporosis"))
            row.update(p_normal=pn, p_low_bone_mass=pl, p_osteoporosis=po)
            row["score"] = pl / (pn + pl) if pn + pl > 0 else None
            category = ("normal", "low_bone_mass", "osteoporosis")[int(np.argmax([pn, pl, po]))]
        elif mode == "stage1":
            s1 = float(probs_main[i][positive])  # type: ignore[index]
            row["score_stage1"] = s1
            category = "osteoporosis" if s1 >= threshold else "not_osteoporosis"
        elif mode in ("stage2", "cascade"):
            s2 = None
            if probs_main is not None and not np.isnan(probs_main[i][positive]):
                s2 = float(probs_main[i][positive])
            row["score_stage2"] = row["score"] = s2
            category = None
            if mode == "cascade":
                s1 = float(probs_stage1[i][positive_stage1])  # type: ignore[index]
                row["score_stage1"] = s1
                if s1 >= threshold_stage1:
                    category = "osteoporosis"
            if category is None:
                if s2 is None:
                    raise ValueError(f"row {i}: stage-2 score missing for an image stage 1 did not flag")
                category = "low_bone_mass" if s2 >= threshold else "normal"
        else:
            raise ValueError(f"unknown mode {mode!r}")
        row["category"] = category
        row["flag"] = category in ("low_bone_mass", "osteoporosis")
        out.append(row)
    return out


def decide_pediatric(preds: Any, *, threshold: float | None = None) -> list[dict[str, Any]]:
    """Rows from :func:`bonescreen.pediatric.predict_pediatric` output (pure; easy to test).

    ``score`` = P(Z <= -2.0); ``category`` ``low_bmd`` / ``normal_bmd``. With
    ``threshold`` None the model's own decision (predicted Z <= -2.0, the
    ``low_bmd`` column) flags; a number flags ``score >= threshold`` instead
    (an operating point chosen on a tuning set). A row with a ``reason``
    (``missing_clinical:<names>``) becomes a skip: ``eligible`` False, no score.
    """
    out: list[dict[str, Any]] = []
    for rec in preds.to_dict("records"):
        row: dict[str, Any] = {
            "score": None, "score_stage1": None, "score_stage2": None,
            "p_normal": None, "p_low_bone_mass": None, "p_osteoporosis": None,
            "pred_z": None, "pred_bmd": None, "category": None, "flag": None,
        }
        reason = str(rec.get("reason") or "")
        z, bmd, prob = (float(rec[k]) for k in ("pred_z", "pred_bmd", "prob_low_bmd"))
        if not reason and not all(np.isfinite(v) for v in (z, bmd, prob)):
            reason = "model_error"
        if reason:
            what = reason.split(":", 1)[1].replace("+", ", ") if ":" in reason else ""
            row.update(eligible=False, reason=reason,
                       message=(f"the pediatric model needs {what}" if what
                                else "the model returned no finite prediction"))
            out.append(row)
            continue
        low = bool(rec["low_bmd"]) if threshold is None else prob >= threshold
        row.update(score=prob, pred_z=z, pred_bmd=bmd, category=PEDIATRIC_CATEGORIES[int(low)], flag=low)
        out.append(row)
    return out


def _predict_pediatric(models: ModelSet, images: np.ndarray, clinical: Sequence[Mapping[str, Any]] | None,
                       threshold: float) -> list[dict[str, Any]]:
    import pandas as pd

    from bonescreen.pediatric import predict_pediatric

    if clinical is None or len(clinical) != len(images):
        raise ScreenError("a pediatric model needs one clinical row (age, sex, height_cm, weight_kg) per image")
    frame = pd.DataFrame([{k: c.get(k) for k in ("age", "sex", "height_cm", "weight_kg")} for c in clinical],
                         columns=["age", "sex", "height_cm", "weight_kg"])
    preds = predict_pediatric(models.main, images, frame)
    # the artifact's cut-off (0.5 = predicted Z <= -2.0): the model's own rule, exact at the boundary
    own = threshold == float(models.main.spec.threshold)
    return decide_pediatric(preds, threshold=None if own else threshold)


def predict_batch(
    models: ModelSet,
    images: Mapping[int, np.ndarray],
    *,
    threshold: float,
    threshold_stage1: float,
    always_stage2: bool = False,
    clinical: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run the model(s) on one batch (``images``: size -> uint8 N×S×S) and decide.

    ``clinical`` (pediatric models only): per image ``age, sex, height_cm, weight_kg``.
    Pediatric rows the model cannot score come back with ``eligible`` False and a reason.
    """
    main_x = images[models.main.size]
    n = len(main_x)
    if models.pediatric:
        return _predict_pediatric(models, main_x, clinical, threshold)
    if models.stage1 is None:
        probs = np.asarray(models.main.predict_proba(main_x))
        return decide(models.mode, probs, threshold=threshold, positive=_pos(models.main),
                      class_names=models.main.spec.class_names)
    p1 = np.asarray(models.stage1.predict_proba(images[models.stage1.size]))
    s1 = p1[:, _pos(models.stage1)]
    run = np.ones(n, bool) if always_stage2 else s1 < threshold_stage1
    p2 = np.full((n, int(models.main.spec.num_classes)), np.nan)
    if run.any():
        p2[run] = models.main.predict_proba(main_x[run])
    return decide("cascade", p2, p1, threshold=threshold, threshold_stage1=threshold_stage1,
                  positive=_pos(models.main), positive_stage1=_pos(models.stage1))


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


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


def _walk(folder: Path, exclude: set[str]) -> Iterator[Path]:
    """Sorted, lazy (one directory listing at a time), hidden files and ``exclude`` folders skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and
                         os.path.realpath(os.path.join(root, d)) not in exclude)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def iter_inputs(inputs: Iterable[str | os.PathLike[str]], *, exclude: Iterable[str | os.PathLike[str]] = ()
                ) -> Iterator[InputItem]:
    """Files, folders (recursive; every non-hidden file gets a row) and manifests (.csv/.tsv with ``path``)."""
    ex = {os.path.realpath(e) for e in exclude}
    seen: set[str] = set()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            items: Iterator[InputItem] = (InputItem(str(f)) for f in _walk(p, ex))
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


# --------------------------------------------------------------------------
# Per-image preparation (runs in worker threads)
# --------------------------------------------------------------------------


@dataclass
class Prepared:
    row: dict[str, Any]
    images: dict[int, np.ndarray] | None = None  # size -> uint8 (S, S); None when skipped
    clinical: dict[str, Any] | None = None  # pediatric: age, sex, height_cm, weight_kg


# --------------------------------------------------------------------------
# Pediatric clinical inputs: DICOM header, screening manifest, --clinical CSV
# --------------------------------------------------------------------------


def _num(value: Any) -> float | None:
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


def _parse_date(value: str | None) -> Any:
    """ISO ``YYYY-MM-DD`` or DICOM ``YYYYMMDD``; None otherwise."""
    import datetime as dt

    text = (value or "").strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text[:10], fmt).date()
        except ValueError:
            continue
    return None


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
            dated = [(d, r) for r in rows if (d := _parse_date(r.get("study_date") or r.get("exam_date")))]
            if study_date is not None and len(dated) == len(rows):
                gaps = sorted((abs((d - study_date).days), i) for i, (d, _r) in enumerate(dated))
                if len(gaps) == 1 or gaps[0][0] < gaps[1][0]:
                    return dated[gaps[0][1]][1], ""
            return None, f"{len(rows)} rows in --clinical match this image's {key} and no date picks one"
        return None, ""


def _header_body_size(path: str) -> tuple[float | None, float | None, list[str]]:
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
    size_m, weight = _num(ds.get("PatientSize")), _num(ds.get("PatientWeight"))
    height = None if size_m is None else round(size_m * 100.0, 2)
    if height is not None and not _in_range(height, HEIGHT_CM_RANGE):
        notes.append(f"PatientSize {size_m:g} m is implausible (metres expected); ignored")
        height = None
    if weight is not None and not _in_range(weight, WEIGHT_KG_RANGE):
        notes.append(f"PatientWeight {weight:g} kg is implausible; ignored")
        weight = None
    return height, weight, notes


def _fill_from_clinical(meta: Any, row: Mapping[str, str] | None) -> None:
    """A --clinical row fills age/sex only where the header and manifest have none."""
    if not row:
        return
    if meta.age is None and _num(row.get("age")) is not None:
        meta.age = _num(row.get("age"))
    if meta.sex is None and row.get("sex"):
        s = row["sex"].strip().upper()[:1]
        meta.sex = s if s in ("F", "M", "O") else None


def _clinical_inputs(item: InputItem, meta: Any, csv_row: Mapping[str, str] | None, csv_note: str
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
        h, w, notes = _header_body_size(item.path)
        values.update(height_cm=h, weight_kg=w)
        if h is not None or w is not None:
            sources.append("dicom")
    for name, table in (("manifest", item.extra), ("clinical_csv", csv_row or {})):
        used = False
        for key, rng in (("height_cm", HEIGHT_CM_RANGE), ("weight_kg", WEIGHT_KG_RANGE)):
            if values[key] is not None or not table.get(key):
                continue
            v = _num(table.get(key))
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


def _hash_id(path: str) -> str:
    return "sha256:" + file_sha256(path)[:32]


def _patient_key(pid: str | None, include: bool, pseudonymiser: Pseudonymiser | None) -> str | None:
    if not pid:
        return None
    if include:
        return pid
    if pseudonymiser is None:  # callers that do not output patient ids (explain, export)
        return None
    return pseudonymiser(pid)


def _fill_meta(meta: Any, extra: Mapping[str, str]) -> None:
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


@dataclass(frozen=True)
class PrepContext:
    """How :func:`prepare` gates and preprocesses: the policy, model input sizes, ids."""

    policy: GatePolicy
    sizes: tuple[int, ...]
    site: str | None
    include_patient_id: bool
    pseudonymiser: Pseudonymiser | None
    pediatric: bool = False  # collect height/weight/age/sex for a pediatric model
    clinical: ClinicalTable | None = None


def prepare(item: InputItem, ctx: PrepContext) -> Prepared:
    """Gate, decode and preprocess one image; never raises for a bad file (returns a skip row)."""
    from bonescreen.io import read_image, read_meta
    from bonescreen.preprocess import preprocess_array

    row: dict[str, Any] = {
        "path": item.path, "image_id": item.extra.get("image_id") or None, "eligible": False,
        "reason": "", "message": "", "site": item.extra.get("site") or ctx.site,
    }
    sidecar = item.extra or None
    clinical: dict[str, Any] | None = None
    try:
        meta = read_meta(item.path, sidecar=sidecar)
        _fill_meta(meta, item.extra)
        row["image_id"] = row["image_id"] or meta.sop_instance_uid or _hash_id(item.path)
        csv_row, csv_note = None, ""
        if ctx.pediatric and ctx.clinical is not None:
            csv_row, csv_note = ctx.clinical.lookup(row["image_id"], meta.patient_id, meta.study_date)
            _fill_from_clinical(meta, csv_row)
        row.update(
            sex=meta.sex, age=None if meta.age is None else round(float(meta.age), 2), view=meta.view,
            modality=meta.modality, study_date=meta.study_date.isoformat() if meta.study_date else None,
            patient_id=_patient_key(meta.patient_id, ctx.include_patient_id, ctx.pseudonymiser),
        )
        decision = check_header(meta, ctx.policy)
        if not decision.eligible:
            return _skip(row, decision)
        if ctx.pediatric:
            clinical, cols, missing, message = _clinical_inputs(item, meta, csv_row, csv_note)
            row.update(cols)
            if missing:  # decided before the (costly) pixel decode
                return _skip(row, GateDecision.refuse(missing, message))
            if message:
                row["message"] = message
        image, _ = read_image(item.path, sidecar=sidecar, allowed_modalities=None)
        decision = check_pixels(image, ctx.policy)
        if not decision.eligible:
            return _skip(row, decision)
        images = {s: preprocess_array(image, s) for s in ctx.sizes}
        del image
    except BonescreenError as exc:
        return _skip(row, GateDecision.refuse(exc.reason, str(exc)))
    except MemoryError:
        return _skip(row, GateDecision.refuse("out_of_memory", "out of memory while decoding"))
    except Exception as exc:  # one bad file must never stop the run
        log.debug("unexpected error on %s", item.path, exc_info=True)
        return _skip(row, GateDecision.refuse("error", f"{type(exc).__name__}: {exc}"))
    row["eligible"] = True
    return Prepared(row, images, clinical)


def _skip(row: dict[str, Any], decision: GateDecision) -> Prepared:
    row["eligible"] = False
    row["reason"] = decision.reason
    # io messages start with the path; the row already has it.
    msg = decision.message
    if msg.startswith(row["path"] + ":"):
        msg = msg[len(row["path"]) + 1 :].strip()
    row["message"] = msg
    if row.get("image_id") is None and os.path.isfile(row["path"]):
        try:
            row["image_id"] = _hash_id(row["path"])
        except OSError:
            pass
    return Prepared(row, None)


# --------------------------------------------------------------------------
# Result store (journal + CSV), kill-safe and resumable
# --------------------------------------------------------------------------


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


class ResultStore:
    """``results.jsonl`` (journal, source of truth) + ``results.csv``, appended per batch with fsync."""

    def __init__(self, out_dir: str | os.PathLike[str], columns: Sequence[str] = RESULT_COLUMNS) -> None:
        self.dir = Path(out_dir)
        self.columns = list(columns)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"
        self._j: Any = None
        self._c: Any = None
        self._writer: Any = None

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        if not self.jsonl.is_file():
            return
        with open(self.jsonl, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    yield json.loads(line)

    def recover(self, visit: Callable[[dict[str, Any]], None]) -> int:
        """Drop a torn last line, rewrite the CSV from the journal; call ``visit`` on each row."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 0
        if self.jsonl.is_file():
            with open(self.jsonl, "rb+") as fh:
                data_end = fh.seek(0, os.SEEK_END)
                # Scan back to the last newline: anything after it is a torn write.
                pos = data_end
                while pos > 0:
                    step = min(65536, pos)
                    fh.seek(pos - step)
                    chunk = fh.read(step)
                    k = chunk.rfind(b"\n")
                    if k >= 0:
                        pos = pos - step + k + 1
                        break
                    pos -= step
                if pos != data_end:
                    log.warning("dropping a partially written last row in %s", self.jsonl)
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())
        tmp = self.csv.with_name(f".{self.csv.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            w = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            bad = 0
            if self.jsonl.is_file():
                with open(self.jsonl, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            bad += 1
                            continue
                        w.writerow({k: _csv_value(row.get(k)) for k in self.columns})
                        visit(row)
                        n += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.csv)
        if bad:  # a corrupt line in the middle (disk trouble): keep only the parseable rows
            log.warning("%d unreadable row(s) in %s dropped", bad, self.jsonl)
            jtmp = self.jsonl.with_name(f".{self.jsonl.name}.tmp")
            with open(jtmp, "w", encoding="utf-8") as out, open(self.jsonl, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    out.write(line)
            os.replace(jtmp, self.jsonl)
        return n

    def open(self) -> None:
        self._j = open(self.jsonl, "a", encoding="utf-8")
        self._c = open(self.csv, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._c, fieldnames=self.columns, extrasaction="ignore")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        for row in rows:
            self._j.write(json.dumps({k: row.get(k) for k in self.columns}) + "\n")
            self._writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})
        for fh in (self._j, self._c):
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        for fh in (self._j, self._c):
            if fh is not None:
                fh.close()
        self._j = self._c = None


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class ScreenOptions:
    batch_size: int = 8
    workers: int = 2
    threshold: float | None = None  # None: the artifact's
    threshold_stage1: float | None = None
    always_stage2: bool = False
    explain: bool = False
    dicom_sr: bool = False
    dicom_sc: bool = False
    site: str | None = None
    include_patient_id: bool = False
    # HMAC key for patient pseudonyms (bonescreen.pseudonym); None: $BONESCREEN_PSEUDONYM_KEY_FILE
    # or the per-user default, generated on first use
    pseudonym_key_file: str | os.PathLike[str] | None = None
    labels: str | os.PathLike[str] | None = None
    progress: bool = True
    overwrite: bool = False
    gate: dict[str, Any] = field(default_factory=dict)  # GatePolicy overrides
    clinical: str | os.PathLike[str] | None = None  # pediatric: height/weight CSV (ClinicalTable)


@dataclass
class ScreenSummary:
    out_dir: str
    n_rows: int = 0
    n_screened: int = 0
    n_skipped: int = 0
    n_flagged: int = 0
    n_new: int = 0
    n_resumed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    model: str = ""
    model_stage1: str = ""
    backend: str = ""
    mode: str = ""

    def text(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        cats = ", ".join(f"{k}={v}" for k, v in sorted(self.categories.items()))
        s = (f"{self.n_rows} images: {self.n_screened} screened ({cats or 'none'}), "
             f"{self.n_flagged} flagged, {self.n_skipped} skipped")
        if reasons:
            s += f" [{reasons}]"
        if self.n_resumed:
            s += f"; {self.n_resumed} rows kept from an earlier run"
        s += f"; {self.n_new} new in {self.seconds:.1f} s"
        return s + f"; results in {self.out_dir}"


class _Tally:
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.reasons: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.screened = self.skipped = self.flagged = 0
        self.models: set[str] = set()

    def add(self, row: Mapping[str, Any]) -> None:
        self.paths.add(os.path.realpath(row["path"]))
        if row.get("eligible"):
            self.screened += 1
            self.categories[str(row.get("category"))] += 1
            self.flagged += bool(row.get("flag"))
        else:
            self.skipped += 1
            self.reasons[str(row.get("reason"))] += 1


def _run_config(models: ModelSet, policy: GatePolicy, t2: float, t1: float, opts: ScreenOptions,
                clinical: ClinicalTable | None = None, key_id: str | None = None) -> dict[str, Any]:
    return {
        # which key made the pseudonyms (a fingerprint, not the key): a resumed run must not mix two
        "pseudonym_key": key_id,
        "clinical": clinical.id if clinical is not None else None,
        "model": models.main_id,
        "model_stage1": models.stage1_id or None,
        "mode": models.mode,
        "threshold_stage2": t2,
        "threshold_stage1": t1 if models.stage1 is not None else None,
        "always_stage2": opts.always_stage2,
        "gate": policy.as_dict(),
        "include_patient_id": opts.include_patient_id,
    }


def _check_resume(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    run_json = out / "run.json"
    journal = out / "results.jsonl"
    if overwrite:
        for f in (journal, out / "results.csv", out / "predictions.csv", out / "summary.json", run_json):
            f.unlink(missing_ok=True)
    elif run_json.is_file() and journal.is_file():
        old = json.loads(run_json.read_text())
        diff = sorted(k for k in config if old.get(k) != config[k])
        if diff:
            raise ScreenError(
                f"{out} holds results from a run with different settings ({', '.join(diff)}); "
                "pass --overwrite to start again or use another --out folder"
            )
    tmp = run_json.with_name(".run.json.tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, run_json)


def _read_labels(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
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


def write_predictions(store: ResultStore, dest: Path, labels: str | os.PathLike[str] | None = None,
                      mode: str = "") -> int:
    """``predictions.csv`` for ``bonescreen evaluate``: screened rows, labels joined when given.

    Pediatric (``mode="pediatric"``): ``label`` = the manifest's DXA Z-score <= -2.0
    (``labels.pediatric_low_bmd``; the manifest's own ``label`` only when it has no Z),
    plus ``z_true/bmd_true`` and ``z_pred/bmd_pred`` for ``bonescreen pediatric evaluate``.
    """
    from bonescreen.labels import pediatric_low_bmd

    by_id: dict[str, dict[str, str]] = {}
    by_path: dict[str, dict[str, str]] = {}
    if labels:
        by_id, by_path = _read_labels(labels)
    columns = prediction_columns(mode)
    tmp = dest.with_name(f".{dest.name}.tmp")
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as out:
        w = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in store.iter_rows():
            if not row.get("eligible"):
                continue
            lab = by_id.get(str(row.get("image_id"))) or by_path.get(os.path.realpath(row["path"])) or {}
            rec = {k: row.get(k) for k in columns}
            rec["label"] = lab.get("label", "")
            if mode == "pediatric":
                z_true = _num(lab.get(PEDIATRIC_Z_COLUMN))
                rec.update(z_pred=row.get("pred_z"), bmd_pred=row.get("pred_bmd"), z_true=z_true,
                           bmd_true=_num(lab.get("bmd_lumbar_spine")))
                if z_true is not None:
                    rec["label"] = int(bool(pediatric_low_bmd(z_true)))
            rec["label_stage1"] = lab.get("label_stage1", "")
            for k in ("t_min", "severity", "split"):
                rec[k] = lab.get(k, "")
            for k in ("site", "sex", "age"):  # the cohort's values where the image had none
                if rec.get(k) in (None, "") and lab.get(k):
                    rec[k] = lab[k]
            if lab.get("patient_id") and not rec.get("patient_id"):
                rec["patient_id"] = lab["patient_id"]
            # a cascade row flagged by stage 1 has no stage-2 score; evaluate drops it with a warning
            w.writerow({k: _csv_value(v) for k, v in rec.items()})
            n += 1
    os.replace(tmp, dest)
    return n


def screen(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str] | ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    stage1: str | os.PathLike[str] | None = None,
    backend: str = "torch",
    threads: int | None = None,
    options: ScreenOptions | None = None,
) -> ScreenSummary:
    """Screen every image under ``inputs``; results in ``out_dir`` (see module docstring)."""
    from tqdm.auto import tqdm

    opts = options or ScreenOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = model if isinstance(model, ModelSet) else load_models(
        model, stage1, backend=backend, threads=threads, cache_dir=out / ".onnx"
    )
    if opts.batch_size < 1 or opts.workers < 1:
        raise ScreenError("batch size and workers must be at least 1")
    clinical = ClinicalTable(opts.clinical) if opts.clinical else None
    if clinical is not None and not models.pediatric:
        raise ScreenError("--clinical gives height/weight to a pediatric model; this is a "
                          f"{models.mode!r} run, which does not use them")
    if (opts.explain or opts.dicom_sc) and models.main_torch is None:
        raise ScreenError("Grad-CAM needs the .pt artifact (an ONNX file has no gradients); "
                          "pass the .pt with --backend onnx instead")
    gate_kw = dict(opts.gate)
    if gate_kw.get("min_size") is None and "min_size" not in (models.main.spec.eligibility or {}):
        # thumbnails are refused, but a low-resolution model (cpu-tiny presets) accepts its own size
        gate_kw["min_size"] = min(256, min(models.sizes))
    policy = GatePolicy.from_eligibility(models.main.spec.eligibility, **gate_kw)
    t2 = float(opts.threshold if opts.threshold is not None else models.main.spec.threshold)
    t1 = float(opts.threshold_stage1 if opts.threshold_stage1 is not None else
               (models.stage1.spec.threshold if models.stage1 is not None else 0.5))
    pseudonymiser = key_id = None
    if not opts.include_patient_id:
        key = load_or_create_key(opts.pseudonym_key_file)
        pseudonymiser, key_id = Pseudonymiser(key), key_fingerprint(key)
    _check_resume(out, _run_config(models, policy, t2, t1, opts, clinical, key_id), opts.overwrite)

    store = ResultStore(out, result_columns(models.mode))
    tally = _Tally()

    def visit(row: dict[str, Any]) -> None:
        tally.add(row)

    n_resumed = store.recover(visit)
    if n_resumed:
        log.info("resuming: %d image(s) already have a row in %s", n_resumed, store.jsonl)

    ctx = PrepContext(policy, tuple(models.sizes), opts.site, opts.include_patient_id, pseudonymiser,
                      pediatric=models.pediatric, clinical=clinical)
    explainers: dict[str, Any] = {}
    if opts.explain or opts.dicom_sc:
        from bonescreen.explain import Explainer, PediatricExplainer

        explainers["main"] = (PediatricExplainer if models.pediatric else Explainer)(models.main_torch)
        if models.stage1_torch is not None:
            explainers["stage1"] = Explainer(models.stage1_torch)
    common = {
        "threshold_stage1": t1 if models.stage1 is not None else None,
        "threshold_stage2": t2 if models.mode in ("stage2", "cascade", "pediatric") else None,
        "model": models.main_id, "model_stage1": models.stage1_id or None,
        "backend": models.backend, "bonescreen_version": __version__,
    }
    if models.mode == "stage1":
        common["threshold_stage1"], common["threshold_stage2"] = t2, None

    exclude = [str(out)]
    total = count_inputs(inputs, exclude=exclude)
    bar = tqdm(total=total, unit="img", desc="screen", disable=not opts.progress)
    bar.update(min(total, len(tally.paths)))
    start = time.perf_counter()
    n_new = 0
    pending_rows: list[dict[str, Any]] = []
    batch: list[Prepared] = []
    store.open()

    def flush_rows() -> None:
        store.append(pending_rows)
        for r in pending_rows:
            tally.add(r)
        bar.update(len(pending_rows))
        pending_rows.clear()

    def run_batch() -> None:
        if not batch:
            return
        imgs = {s: np.stack([b.images[s] for b in batch]) for s in models.sizes}  # type: ignore[index]
        decided = predict_batch(models, imgs, threshold=t2, threshold_stage1=t1, always_stage2=opts.always_stage2,
                                clinical=[b.clinical or {} for b in batch] if models.pediatric else None)
        for b, d in zip(batch, decided):
            b.row.update(d)
            b.row.update(common)
        scored = [b for b in batch if b.row.get("eligible")]  # pediatric rows may be refused by the model
        if explainers and scored:
            _explain_batch(scored, models, explainers, out, opts)
        if opts.dicom_sr and scored:
            _write_srs(scored, models, out, t1, t2)
        for b in batch:
            pending_rows.append(b.row)
            b.images = None
        batch.clear()
        flush_rows()

    todo = (it for it in iter_inputs(inputs, exclude=exclude) if os.path.realpath(it.path) not in tally.paths)
    window = max(2 * opts.workers, opts.batch_size)
    try:
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="screen-prep") as pool:
            inflight: deque[Future[Prepared]] = deque()
            exhausted = False
            while True:
                while not exhausted and len(inflight) < window:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    inflight.append(pool.submit(prepare, item, ctx))
                if not inflight:
                    break
                prep = inflight.popleft().result()
                n_new += 1
                if prep.images is None:
                    prep.row.update(common)
                    pending_rows.append(prep.row)
                    if len(pending_rows) >= opts.batch_size:
                        flush_rows()
                else:
                    batch.append(prep)
                    if len(batch) >= opts.batch_size:
                        run_batch()
            run_batch()
            flush_rows()
    finally:
        store.close()
        bar.close()

    seconds = time.perf_counter() - start
    n_pred = write_predictions(store, out / "predictions.csv", opts.labels, mode=models.mode)
    summary = ScreenSummary(
        out_dir=str(out), n_rows=tally.screened + tally.skipped, n_screened=tally.screened,
        n_skipped=tally.skipped, n_flagged=tally.flagged, n_new=n_new, n_resumed=n_resumed,
        reasons=dict(tally.reasons), categories=dict(tally.categories), seconds=round(seconds, 3),
        images_per_s=round(n_new / seconds, 3) if seconds > 0 else 0.0, model=models.main_id,
        model_stage1=models.stage1_id, backend=models.backend, mode=models.mode,
    )
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps({**summary.__dict__, "n_predictions": n_pred}, indent=2))
    os.replace(tmp, out / "summary.json")
    return summary


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(image_id: str) -> str:
    """A file name from an image id (UIDs pass unchanged; ``sha256:..`` becomes ``sha256_..``)."""
    return _SAFE.sub("_", str(image_id))[:120] or "image"


def _explain_batch(batch: list[Prepared], models: ModelSet, explainers: Mapping[str, Any], out: Path,
                   opts: ScreenOptions) -> None:
    """Grad-CAM of the model that decided: stage 1 for osteoporosis, else the main model."""
    from bonescreen.explain import overlay, save_png

    groups: dict[str, list[int]] = {}
    for i, b in enumerate(batch):
        key = "stage1" if b.row.get("category") == "osteoporosis" and "stage1" in explainers else "main"
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        ex = explainers[key]
        size = ex.loaded.size
        imgs = np.stack([batch[i].images[size] for i in idx])  # type: ignore[index]
        if models.pediatric:  # towards lower predicted Z, with each image's clinical row held fixed
            cams = ex.cams(imgs, clinical_raw([batch[i].clinical or {} for i in idx]))
        else:
            if key == "main" and models.mode == "three_class":
                classes = [ex.loaded.spec.class_names.index(batch[i].row["category"]) for i in idx]
            else:
                classes = None  # the positive class
            cams = ex.cams(imgs, classes)
        for j, i in enumerate(idx):
            row = batch[i].row
            rgb = overlay(imgs[j], cams[j])
            if opts.explain:
                rel = Path("overlays") / f"{safe_name(row['image_id'])}.png"
                save_png(out / rel, rgb)
                row["overlay"] = str(rel)
            if opts.dicom_sc and row.get("modality") and _is_dicom(row["path"]):
                from bonescreen.dicom_out import write_sc

                rel = Path("dicom") / f"{safe_name(row['image_id'])}.SC.dcm"
                try:
                    write_sc(row["path"], rgb, out / rel, model_id=models.main_id)
                    row["sc"] = str(rel)
                except Exception as exc:  # the score stands; only the DICOM copy failed
                    _note(row, f"secondary capture not written ({type(exc).__name__}: {exc})")


def _is_dicom(path: str) -> bool:
    from bonescreen.io import sniff_format

    try:
        return sniff_format(path) == "dicom"
    except BonescreenError:
        return False


def _write_srs(batch: list[Prepared], models: ModelSet, out: Path, t1: float, t2: float) -> None:
    from bonescreen.dicom_out import ScreeningResult, write_sr

    for b in batch:
        row = b.row
        if not _is_dicom(row["path"]):
            continue  # an SR must reference a DICOM source image
        rel = Path("dicom") / f"{safe_name(row['image_id'])}.SR.dcm"
        try:
            result = ScreeningResult.from_row(row, models, threshold=t2, threshold_stage1=t1)
            write_sr(row["path"], result, out / rel)
            row["sr"] = str(rel)
        except Exception as exc:  # the score stands; only the SR failed
            _note(row, f"SR not written ({type(exc).__name__}: {exc})")


def _note(row: dict[str, Any], text: str) -> None:
    log.warning("%s: %s", row.get("image_id"), text)
    row["message"] = f"{row['message']}; {text}" if row.get("message") else text
