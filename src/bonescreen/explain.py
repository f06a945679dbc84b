"""Batch Grad-CAM overlays (``bonescreen explain``): images gated and scored by
``screen``'s engine, one PNG per eligible image and ``explain.csv``.

The Grad-CAM itself (target layer found automatically, overlays, PNG writes) is in
``bonescreen.gradcam``, below ``screen``; its names are re-exported here.

Pediatric models (image + clinical variables -> Z-score) have no classifier
output; :class:`PediatricExplainer` routes them to
:func:`bonescreen.pediatric.explain.gradcam_low_bmd` (target: lower predicted
Z, each image's clinical row held fixed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.gradcam import ExplainError, Explainer, find_target_layer, overlay, save_png
from bonescreen.pediatric.explain import PediatricExplainer

__all__ = ["ExplainError", "Explainer", "PediatricExplainer", "explain_paths", "find_target_layer", "overlay",
           "save_png"]


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

    from bonescreen.screen import ClinicalTable, ScreeningEngine, count_inputs, iter_inputs, load_models, safe_name

    models = load_models(model)
    loaded = models.main_torch
    pediatric = models.pediatric
    names = list(loaded.spec.class_names)
    if target is not None and target not in names:
        raise ExplainError(f"class {target!r} is not one of this model's classes {names}")
    if pediatric and target not in (None, "low_bmd"):
        raise ExplainError("a pediatric model is explained towards low_bmd (lower predicted Z-score) only")
    if clinical is not None and not pediatric:
        raise ExplainError("--clinical gives height/weight to a pediatric model; this model does not use them")
    cls = names.index(target) if target is not None else int(loaded.spec.positive_class)
    overrides = dict(gate_overrides or {})
    if not gate:  # only image sanity: explaining a lateral or a child is allowed on purpose
        overrides["check_scope"] = False
        ood = "off"
    table = ClinicalTable(clinical) if (pediatric and clinical is not None) else None
    engine = ScreeningEngine(models, gate=overrides, ood=ood, clinical=table)
    explainer: Any = PediatricExplainer(loaded) if pediatric else Explainer(loaded)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"explained": 0, "skipped": 0}
    bar = tqdm(total=count_inputs(inputs, exclude=[out]), unit="img", desc="explain", disable=not progress)
    with open(out / "explain.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=PEDIATRIC_EXPLAIN_COLUMNS if pediatric else EXPLAIN_COLUMNS,
                                extrasaction="ignore")
        writer.writeheader()
        batch: list[Any] = []

        def flush() -> None:
            if not batch:
                return
            outputs = engine.infer(batch)
            rows = engine.decide(outputs)
            keep = [k for k, r in enumerate(rows) if r.get("reason") != "out_of_distribution" or ood == "flag"]
            for k, (b, r) in enumerate(zip(batch, rows)):
                if k not in keep:  # refused by the OOD check: listed with its reason, no map
                    b.row.update(eligible=False, reason=r["reason"], message=r["message"])
                    writer.writerow(b.row)
                    counts["skipped"] += 1
            sel = [batch[k] for k in keep]
            if sel:
                imgs = np.stack([b.images[loaded.size] for b in sel])
                extra: list[dict[str, Any]] = [{} for _ in sel]
                if pediatric:
                    from bonescreen.screen import clinical_raw

                    clin = [b.clinical or {} for b in sel]
                    preds = outputs.pediatric.iloc[keep]
                    probs = preds["prob_low_bmd"].to_numpy(dtype=float)
                    cams = explainer.cams(imgs, clinical_raw(clin))
                    extra = [{"pred_z": float(z), "pred_bmd": float(bm), **c}
                             for z, bm, c in zip(preds["pred_z"], preds["pred_bmd"], clin)]
                else:
                    probs = np.asarray(outputs.probs_main)[keep][:, cls]
                    cams = explainer.cams(imgs, cls)
                for b, img, cam, p, ex in zip(sel, imgs, cams, probs, extra):
                    name = f"{safe_name(b.row['image_id'])}.png"
                    save_png(out / name, overlay(img, cam))
                    writer.writerow({**b.row, **ex, "class": names[cls], "probability": float(p), "overlay": name})
                    counts["explained"] += 1
            bar.update(len(batch))
            batch.clear()

        for item in iter_inputs(inputs, exclude=[out]):
            prep = engine.prepare(item)
            if prep.images is None:
                writer.writerow(prep.row)
                counts["skipped"] += 1
                bar.update(1)
                continue
            batch.append(prep)
            if len(batch) >= batch_size:
                flush()
        flush()
    bar.close()
    return {**counts, "csv": str(out / "explain.csv"), "class": names[cls]}
