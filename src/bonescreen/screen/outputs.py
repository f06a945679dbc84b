"""Outputs of a screening run besides the journal.

- ``predictions.csv``: the screened rows in the ``evaluate`` schema, labels joined;
- ``studies.csv``: one row per patient study (``schema.STUDY_COLUMNS``), decided by
  :func:`bonescreen.screen.decide.rollup_study`;
- ``dicom/<study>.SR.dcm``: one TID 1500 SR per study, referencing every image it used;
- ``overlays/<image>.png`` and ``dicom/<image>.SC.dcm``: Grad-CAM per image.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.errors import BonescreenError
from bonescreen.fsio import atomic_open
from bonescreen.schema import STUDY_COLUMNS
from bonescreen.screen.decide import rollup_study
from bonescreen.screen.inputs import PEDIATRIC_Z_COLUMN, optional_float, read_labels
from bonescreen.screen.journal import ResultStore, csv_value
from bonescreen.tasks import CASCADE, mode_task

__all__ = [
    "group_studies",
    "is_dicom",
    "prediction_columns",
    "safe_name",
    "study_result",
    "write_image_files",
    "write_parquet",
    "write_predictions",
    "write_studies",
]

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def prediction_columns(mode: str) -> list[str]:
    """The ``predictions.csv`` columns of a run in ``mode`` (its task's, from ``bonescreen.schema``)."""
    return mode_task(mode).prediction_columns()


def safe_name(image_id: str) -> str:
    """A file name from an image id (UIDs pass unchanged; ``sha256:..`` becomes ``sha256_..``)."""
    return _SAFE.sub("_", str(image_id))[:120] or "image"


def is_dicom(path: str) -> bool:
    from bonescreen.io import sniff_format

    try:
        return sniff_format(path) == "dicom"
    except BonescreenError:
        return False


def _note(row: dict[str, Any], text: str) -> None:
    log.warning("%s: %s", row.get("image_id"), text)
    row["message"] = f"{row['message']}; {text}" if row.get("message") else text


def write_image_files(rows: Sequence[dict[str, Any]], rgbs: Sequence[np.ndarray | None], out: Path, *,
                      png: bool, sc: bool, model_id: str) -> None:
    """Grad-CAM overlay PNG (``overlay`` column) and secondary capture (``sc``) per scored image."""
    from bonescreen.gradcam import save_png

    for row, rgb in zip(rows, rgbs):
        if rgb is None:
            continue
        if png:
            rel = Path("overlays") / f"{safe_name(row['image_id'])}.png"
            save_png(out / rel, rgb)
            row["overlay"] = str(rel)
        if sc and row.get("modality") and is_dicom(row["path"]):
            from bonescreen.dicom_out import write_sc

            rel = Path("dicom") / f"{safe_name(row['image_id'])}.SC.dcm"
            try:
                write_sc(row["path"], rgb, out / rel, model_id=model_id)
                row["sc"] = str(rel)
            except Exception as exc:  # the score stands; only the DICOM copy failed
                _note(row, f"secondary capture not written ({type(exc).__name__}: {exc})")


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
        by_id, by_path = read_labels(labels)
    task = mode_task(mode)
    columns = task.prediction_columns()
    n = 0
    with atomic_open(dest, "w", newline="") as out:
        w = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in store.iter_rows():
            if not row.get("eligible"):
                continue
            lab = by_id.get(str(row.get("image_id"))) or by_path.get(os.path.realpath(row["path"])) or {}
            rec = {k: row.get(k) for k in columns}
            rec["label"] = lab.get("label", "")
            if task.regression:  # predicted DXA values beside their truth
                z_true = optional_float(lab.get(PEDIATRIC_Z_COLUMN))
                rec.update(z_pred=row.get("pred_z"), bmd_pred=row.get("pred_bmd"), z_true=z_true,
                           bmd_true=optional_float(lab.get("bmd_lumbar_spine")))
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
            w.writerow({k: csv_value(v) for k, v in rec.items()})
            n += 1
    return n


# --------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------


def study_key(row: Mapping[str, Any]) -> str:
    """Rows group by StudyInstanceUID; an image without one (PNG, JPEG) is a study of its own."""
    uid = row.get("study_instance_uid")
    return str(uid) if uid else f"image:{row.get('image_id') or row.get('path')}"


def group_studies(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Study key -> its rows, in input order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(study_key(r), []).append(r)
    return groups


def study_result(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``studies.csv`` row: the study's identifiers plus :func:`rollup_study`."""
    first = rows[0]
    roll = rollup_study(rows)

    def common(key: str) -> Any:
        return next((r.get(key) for r in rows if r.get(key)), None)

    return {
        "study_instance_uid": first.get("study_instance_uid"), "accession_number": common("accession_number"),
        "patient_id": common("patient_id"), "study_date": common("study_date"), "site": common("site"),
        "model": common("model"), **roll, "image_ids": ";".join(roll["image_ids"]),
    }


def _sr_result(row: Mapping[str, Any], run: Mapping[str, Any], mode: str) -> Any:
    """A ``dicom_out.ScreeningResult`` from a journal row and the run's facts (its task's codes)."""
    return mode_task(mode).sr_result(row, run, cascade=mode == CASCADE)


def sr_facts(engine: Any) -> dict[str, Any]:
    """What an SR says about the run (model ids, thresholds), from a ScreeningEngine."""
    from bonescreen.labels import PEDIATRIC_LOW_Z

    m = engine.models
    prof = engine.site_profile_facts() or {}
    return {"model": m.main_id, "model_stage1": m.stage1_id, "threshold": engine.t2,
            "threshold_stage1": engine.t1, "arch": str(m.main.spec.arch),
            "z_threshold": float((m.main.spec.extra or {}).get("z_threshold", PEDIATRIC_LOW_Z)),
            "site_profile": prof.get("name"), "abstain_band": prof.get("abstain_band")}


def write_study_sr(rows: Sequence[Mapping[str, Any]], study: Mapping[str, Any], source_path: str,
                   dest: Path, run: Mapping[str, Any], mode: str) -> Path:
    """The study's SR: every eligible image of ``rows`` referenced, the study's finding from ``study``.

    ``source_path``: a DICOM file of the study (patient and study are copied from it).
    Rows need ``image_id`` (the SOP Instance UID), ``sop_class_uid``, ``series_instance_uid``.
    """
    from bonescreen.dicom_out import DicomOutputError, ImageReference, write_study_sr as write

    used = [r for r in rows if str(r.get("image_id")) in set(study["image_ids"].split(";")
                                                              if isinstance(study["image_ids"], str)
                                                              else study["image_ids"])]
    refs = []
    for r in used:
        if not (r.get("sop_class_uid") and r.get("series_instance_uid") and r.get("study_instance_uid")):
            raise DicomOutputError(f"{r.get('image_id')}: no SOP class / series UID recorded; cannot reference it")
        refs.append((ImageReference(str(r["sop_class_uid"]), str(r["image_id"]), str(r["series_instance_uid"]),
                                    str(r["study_instance_uid"])), _sr_result(r, run, mode)))
    decided = next(r for r in used if str(r.get("image_id")) == str(study["decided_by"]))
    return write(source_path, _sr_result(decided, run, mode), refs, dest, decided_by=str(study["decided_by"]))


def write_studies(store: ResultStore, out: Path, *, sr: bool, run: Mapping[str, Any], mode: str) -> int:
    """``studies.csv`` from the journal, and (``sr``) one SR per study with a DICOM image.

    Runs at the end of every run (and after a resume), so a study whose images
    came in several runs is summarised over all of them.
    """
    groups = group_studies(store.iter_rows())
    with atomic_open(out / "studies.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=STUDY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for key, rows in groups.items():
            res = study_result(rows)
            if sr and res["eligible"] and rows[0].get("study_instance_uid"):
                decided = next(r for r in rows if str(r.get("image_id")) == res["decided_by"])
                if is_dicom(str(decided["path"])):
                    rel = Path("dicom") / f"{safe_name(key)}.SR.dcm"
                    try:
                        write_study_sr(rows, res, str(decided["path"]), out / rel, run, mode)
                        res["sr"] = str(rel)
                    except Exception as exc:  # the results stand; only the SR failed
                        log.warning("study SR not written (%s: %s)", type(exc).__name__, exc)
                        res["message"] = f"SR not written ({type(exc).__name__}: {exc})"
            w.writerow({k: csv_value(res.get(k)) for k in STUDY_COLUMNS})
    return len(groups)


#: Typed Parquet columns; every other result column is a string (a column that is empty in one
#: shard must have the same type as in the next, so types are not inferred per shard).
PARQUET_FLOAT = ("age", "score", "score_stage1", "score_stage2", "p_normal", "p_low_bone_mass", "p_osteoporosis",
                 "ood_score", "threshold_stage1", "threshold_stage2", "pred_z", "pred_bmd", "height_cm", "weight_kg")
PARQUET_BOOL = ("eligible", "flag")
PARQUET_ROWS = 50_000


def parquet_schema(columns: Sequence[str]) -> Any:
    import pyarrow as pa

    def kind(c: str) -> Any:
        return pa.float64() if c in PARQUET_FLOAT else pa.bool_() if c in PARQUET_BOOL else pa.string()

    return pa.schema([(c, kind(c)) for c in columns])


def write_parquet(store: ResultStore, dest: Path, rows_per_shard: int = PARQUET_ROWS) -> int:
    """``dest/part-00000.parquet``, ...: the journal as typed Parquet shards (rewritten from it each run).

    For archive-scale readers (Spark, DuckDB, ``ray.data.read_parquet``, pandas); same columns
    as ``results.csv``. Memory stays bounded: one shard of rows at a time.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(store.columns)
    dest.mkdir(parents=True, exist_ok=True)
    old = set(dest.glob("part-*.parquet"))
    written: set[Path] = set()
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        path = dest / f"part-{len(written):05d}.parquet"
        cols = {c: [_parquet_value(r.get(c), schema.field(c).type) for r in chunk] for c in store.columns}
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.table(cols, schema=schema), tmp)
        os.replace(tmp, path)
        written.add(path)
        chunk.clear()

    n = 0
    for row in store.iter_rows():
        chunk.append(row)
        n += 1
        if len(chunk) >= rows_per_shard:
            flush()
    if chunk or not written:
        flush()
    for stale in old - written:
        stale.unlink(missing_ok=True)
    return n


def _parquet_value(v: Any, typ: Any) -> Any:
    import pyarrow as pa

    if v is None or v == "":
        return None
    if typ == pa.float64():
        return float(v)
    if typ == pa.bool_():
        return bool(v)
    return str(v)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
