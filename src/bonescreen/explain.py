"""Grad-CAM for any convolutional timm backbone (pytorch-grad-cam), and PNG overlays.

The target layer is found automatically: the last module that runs inside
``model.forward_features`` and produces the final feature map (``N, C, h, w``),
i.e. the last stage before global pooling. This is the layer the paper's
Figure 3 style maps use, and it works for ConvNeXt, EfficientNet, ResNet, ...
without a per-family table. Transformers whose features are tokens
(``N, L, C``) are refused with a clear error.

Pediatric models (image + clinical variables -> Z-score) have no classifier
output; :class:`PediatricExplainer` routes them to
:func:`bonescreen.pediatric.explain.gradcam_low_bmd` (target: lower predicted
Z, each image's clinical row held fixed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonescreen.errors import BonescreenError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from bonescreen.artifact import LoadedModel

__all__ = ["ExplainError", "Explainer", "PediatricExplainer", "explain_paths", "find_target_layer", "overlay",
           "save_png"]


class ExplainError(BonescreenError):
    reason = "explain_failed"


def find_target_layer(model: nn.Module, in_chans: int = 1, size: int = 96) -> nn.Module:
    """The module whose output is the backbone's final spatial feature map.

    Runs ``forward_features`` once on a small dummy input with forward hooks
    on every submodule; the last module (in completion order, identities
    skipped) whose output has the same 4-D shape as the features wins.
    """
    import torch
    from torch import nn

    if not hasattr(model, "forward_features"):
        raise ExplainError(f"{type(model).__name__} has no forward_features(); not a timm backbone")
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    handles = []

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            seen.append((mod, tuple(out.shape)))

    for _name, mod in model.named_modules():
        if mod is not model:
            handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, in_chans, size, size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ExplainError(
            f"{type(model).__name__} features have shape {shape}; Grad-CAM here needs a "
            "convolutional feature map (N, C, H, W)"
        )
    target = tuple(feats.shape)
    for mod, shape in reversed(seen):
        if shape == target and not isinstance(mod, nn.Identity):
            return mod
    raise ExplainError(f"no module of {type(model).__name__} produces its feature map {target}")


class Explainer:
    """Grad-CAM maps for a loaded model; the target layer is found once and kept."""

    def __init__(self, loaded: LoadedModel, target_layer: nn.Module | None = None) -> None:
        if getattr(loaded, "model", None) is None:
            raise ExplainError("Grad-CAM needs the PyTorch model (.pt artifact), not an ONNX file")
        self.loaded = loaded
        self.target_layer = target_layer or find_target_layer(
            loaded.model, int(loaded.spec.in_chans), min(int(loaded.size), 128)
        )

    def cams(self, images: np.ndarray, classes: Sequence[int] | int | None = None) -> np.ndarray:
        """Maps in [0, 1] at the input size, ``(N, H, W)``; ``classes`` defaults to the positive class."""
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[None]
        n = len(arr)
        if classes is None:
            classes = [int(self.loaded.spec.positive_class)] * n
        elif isinstance(classes, int):
            classes = [classes] * n
        x = self.loaded.to_tensor(arr)
        model = self.loaded.model
        device = next(model.parameters()).device
        with torch.inference_mode(False), torch.enable_grad():
            with GradCAM(model=model, target_layers=[self.target_layer]) as cam:
                maps = cam(input_tensor=x.to(device).clone(),
                           targets=[ClassifierOutputTarget(int(c)) for c in classes])
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float32))
        return np.clip(maps, 0.0, 1.0)


class PediatricExplainer:
    """Grad-CAM of a pediatric model towards "lower predicted Z" (the low-BMD direction)."""

    def __init__(self, loaded: LoadedModel) -> None:
        if getattr(loaded, "model", None) is None:
            raise ExplainError("Grad-CAM needs the PyTorch model (.pt artifact), not an ONNX file")
        if loaded.spec.task != "pediatric":
            raise ExplainError(f"PediatricExplainer needs a pediatric model, this one is {loaded.spec.task!r}")
        self.loaded = loaded

    def cams(self, images: np.ndarray, clinical_raw: np.ndarray) -> np.ndarray:
        """Maps in [0, 1], ``(N, H, W)``; ``clinical_raw`` is ``(N, 4)`` age, sex (F=1), height cm, weight kg."""
        from bonescreen.pediatric.explain import gradcam_low_bmd

        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[None]
        return gradcam_low_bmd(self.loaded, arr, np.asarray(clinical_raw, dtype=float))


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Jet heat map blended on the grey image: uint8 RGB ``(H, W, 3)``; red = most attention."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    rgb = np.repeat(img[..., None], 3, axis=2)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != img.shape:
        cam = cv2.resize(cam, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Atomic PNG write (temp file + rename) so a killed run never leaves half an image."""
    from PIL import Image

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(fh, format="PNG")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


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
