"""Batch Grad-CAM overlays (``bonescreen explain``): images gated and scored by
``screen``'s engine, one PNG per eligible image and ``explain.csv``.

The Grad-CAM itself (target layer found automatically, overlays, PNG writes) is in
``bonescreen.gradcam``, below ``screen``; its names are re-exported here.

Each model's task picks its explainer (``bonescreen.tasks``: ``Task.explainer``).
Pediatric models (image + clinical variables -> Z-score) have no classifier
output; their :class:`PediatricExplainer` routes them to
:func:`bonescreen.pediatric.explain.gradcam_low_bmd` (target: lower predicted
Z, each image's clinical row held fixed). :func:`explain_manifest` is
``bonescreen pediatric explain`` (SHAP of the clinical variables + Grad-CAM per patient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonescreen.gradcam import ExplainError, Explainer, find_target_layer, overlay, save_png
from bonescreen.pediatric.explain import PediatricExplainer

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["ExplainError", "Explainer", "PediatricExplainer", "explain_manifest", "explain_paths",
           "find_target_layer", "overlay", "save_png"]


EXPLAIN_COLUMNS = ["path", "image_id", "eligible", "reason", "message", "class", "probability", "overlay"]
#: pediatric models add the predictions and the clinical inputs the map was computed with
PEDIATRIC_EXPLAIN_COLUMNS = [*EXPLAIN_COLUMNS, "pred_z", "pred_bmd", "age", "sex", "height_cm", "weight_kg"]


def explain_paths(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target: str | None = None,
    gate: bool = True,
    gate_overrides: dict[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    clinical: str | os.PathLike[str] | None = None,
    ood: str = "refuse",
) -> dict[str, Any]:
    """Grad-CAM overlay PNGs for every readable (and, with ``gate``, eligible) image.

    Images are gated, decoded and scored by ``bonescreen.screen.ScreeningEngine``
    (the same gate, OOD check and reasons as ``screen``). ``target`` names the
    class to explain (default: the positive class); ``explain.csv`` in
    ``out_dir`` lists each input with its PNG or the reason it has none. A
    pediatric model is explained towards ``low_bmd`` (lower predicted Z) with
    each image's age, sex, height and weight, found as in ``screen`` (DICOM
    header, manifest columns, ``clinical`` CSV); images without them are listed
    with ``missing_clinical:<names>``. ``gate=False`` (``--no-gate``) keeps only
    the image sanity checks and turns the OOD check off: explaining a lateral, a
    child or an unusual image is then deliberate.
    """
    import csv

    from tqdm.auto import tqdm

    from bonescreen.screen import ClinicalTable, ScreeningEngine, count_inputs, iter_inputs, load_models

    models = load_models(model)
    loaded = models.main_torch
    task = models.task
    pediatric = task.needs_clinical  # explained with its clinical row held fixed
    cls = _explained_class(loaded, task, target, clinical)
    overrides = dict(gate_overrides or {})
    if not gate:  # only image sanity: explaining a lateral or a child is allowed on purpose
        overrides["check_scope"] = False
        ood = "off"
    table = ClinicalTable(clinical) if (pediatric and clinical is not None) else None
    engine = ScreeningEngine(models, gate=overrides, ood=ood, clinical=table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=count_inputs(inputs, exclude=[out]), unit="img", desc="explain", disable=not progress)
    with open(out / "explain.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=PEDIATRIC_EXPLAIN_COLUMNS if pediatric else EXPLAIN_COLUMNS,
                                extrasaction="ignore")
        writer.writeheader()
        run = _ExplainRun(engine, task.explainer(loaded), writer, out, loaded, cls, pediatric, ood)
        batch: list[Any] = []
        for item in iter_inputs(inputs, exclude=[out]):
            prep = engine.prepare(item)
            if prep.images is None:
                writer.writerow(prep.row)
                run.counts["skipped"] += 1
                bar.update(1)
                continue
            batch.append(prep)
            if len(batch) >= batch_size:
                run.write_batch(batch)
                bar.update(len(batch))
                batch = []
        run.write_batch(batch)
        bar.update(len(batch))
    bar.close()
    return {**run.counts, "csv": str(out / "explain.csv"), "class": run.names[cls]}


def _explained_class(loaded: Any, task: Any, target: str | None, clinical: Any) -> int:
    """The class index to explain; refuses a class the model lacks or a request its task cannot serve."""
    names = list(loaded.spec.class_names)
    if target is not None and target not in names:
        raise ExplainError(f"class {target!r} is not one of this model's classes {names}")
    if task.explain_target and target not in (None, task.explain_target):
        raise ExplainError(f"a {task.name} model is explained towards {task.explain_target} (lower predicted "
                           "Z-score) only")
    if clinical is not None and not task.needs_clinical:
        raise ExplainError("--clinical gives height/weight to a pediatric model; this model does not use them")
    return names.index(target) if target is not None else int(loaded.spec.positive_class)


@dataclass
class _ExplainRun:
    """One ``explain_paths`` run: the engine that scores a batch, the explainer and the CSV it writes."""

    engine: Any
    explainer: Any
    writer: Any
    out: Path
    loaded: Any
    cls: int
    pediatric: bool
    ood: str
    counts: dict[str, int] = field(default_factory=lambda: {"explained": 0, "skipped": 0})

    @property
    def names(self) -> list[str]:
        return list(self.loaded.spec.class_names)

    def write_batch(self, batch: list[Any]) -> None:
        """Score ``batch`` as ``screen`` would; a map for each image the OOD check lets through."""
        from bonescreen.screen import safe_name

        if not batch:
            return
        outputs = self.engine.infer(batch)
        rows = self.engine.decide(outputs)
        keep = [k for k, r in enumerate(rows) if r.get("reason") != "out_of_distribution" or self.ood == "flag"]
        for k, (b, r) in enumerate(zip(batch, rows)):
            if k not in keep:  # refused by the OOD check: listed with its reason, no map
                b.row.update(eligible=False, reason=r["reason"], message=r["message"])
                self.writer.writerow(b.row)
                self.counts["skipped"] += 1
        sel = [batch[k] for k in keep]
        if not sel:
            return
        imgs = np.stack([b.images[self.loaded.size] for b in sel])
        extra: list[dict[str, Any]] = [{} for _ in sel]
        if self.pediatric:
            from bonescreen.screen import clinical_raw

            clin = [b.clinical or {} for b in sel]
            preds = outputs.pediatric.iloc[keep]
            probs = preds["prob_low_bmd"].to_numpy(dtype=float)
            cams = self.explainer.cams(imgs, clinical_raw(clin))
            extra = [{"pred_z": float(z), "pred_bmd": float(bm), **c}
                     for z, bm, c in zip(preds["pred_z"], preds["pred_bmd"], clin)]
        else:
            probs = np.asarray(outputs.probs_main)[keep][:, self.cls]
            cams = self.explainer.cams(imgs, self.cls)
        for b, img, cam, p, ex in zip(sel, imgs, cams, probs, extra):
            name = f"{safe_name(b.row['image_id'])}.png"
            save_png(self.out / name, overlay(img, cam))
            self.writer.writerow({**b.row, **ex, "class": self.names[self.cls], "probability": float(p),
                                  "overlay": name})
            self.counts["explained"] += 1


def explain_manifest(
    artifact: str | Path,
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    cache_root: str | Path,
    split: str | None = "test",
    limit: int | None = 20,
    background_split: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Per-patient PNGs and ``shap.csv`` for rows of a pediatric manifest (DXA reference shown when present).

    `bonescreen pediatric explain`: SHAP of the clinical variables + Grad-CAM towards lower predicted Z
    (:mod:`bonescreen.pediatric.explain`); lives here, with the other batch explanation, because it
    loads artifacts (the pediatric explainer itself sits below them, for the task registry).
    """
    import csv

    from tqdm.auto import tqdm

    from bonescreen.artifact import load_artifact
    from bonescreen.data import prepare_images, read_manifest, split_rows
    from bonescreen.pediatric.data import clinical_of, pediatric_rows
    from bonescreen.pediatric.explain import PediatricExplainError, clinical_shap, gradcam_low_bmd, patient_figure
    from bonescreen.pediatric.model import CLINICAL_FEATURES
    from bonescreen.schema import PEDIATRIC_TASK
    from bonescreen.screen import safe_name

    loaded = load_artifact(artifact, expected_task=PEDIATRIC_TASK)
    frame, _ = pediatric_rows(read_manifest(manifest))
    bg_frame = split_rows(frame, background_split) if "split" in frame.columns else frame
    if bg_frame.empty:
        bg_frame = frame
    rows = split_rows(frame, split) if split else frame
    if limit is not None:
        rows = rows.head(limit)
    if rows.empty:
        raise PediatricExplainError(f"no pediatric rows to explain (split {split!r})")
    prep = prepare_images(rows, cache_root, loaded.size, preload="false", progress=False)
    rows = prep.frame
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    background = clinical_of(bg_frame)
    for i in tqdm(range(len(rows)), desc="explain", unit="img", disable=not progress):
        r = rows.iloc[i : i + 1]
        img = prep.source.batch([i])
        clin = clinical_of(r)
        res = loaded.predict_pediatric(img, clin)
        sh = clinical_shap(loaded, img, clin, background)
        cam = gradcam_low_bmd(loaded, img, clin)
        image_id = str(r["image_id"].iloc[0])
        name = f"{safe_name(image_id)}.png"
        ref_bmd = float(r["_bmd"].iloc[0])
        patient_figure(
            out / name, img[0], cam[0], sh.values[0], clin[0],
            pred_z=float(res["z"][0]), pred_bmd=float(res["bmd"][0]),
            ref_z=float(r["_z"].iloc[0]), ref_bmd=ref_bmd if np.isfinite(ref_bmd) else None,
        )
        rec: dict[str, Any] = {"image_id": image_id, "png": name, "pred_z": float(res["z"][0]), "pred_bmd": float(res["bmd"][0]),
               "prob_low_bmd": float(res["prob_low_bmd"][0]), "dxa_z": float(r["_z"].iloc[0]),
               "dxa_bmd": ref_bmd, "shap_base": float(sh.base[0])}
        rec.update({f"shap_{f}": float(v) for f, v in zip(sh.features, sh.values[0])})
        records.append(rec)
    with open(out / "shap.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    mean_abs = {f: float(np.mean([abs(r[f"shap_{f}"]) for r in records])) for f in CLINICAL_FEATURES}
    return {"explained": len(records), "csv": str(out / "shap.csv"), "mean_abs_shap": mean_abs,
            "skipped": prep.skipped.to_dict("records")}
