"""Scoring images with a trained network: logits (one process or sharded), the predictions table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonescreen.artifact import LoadedModel, load_artifact
from bonescreen.config import TrainConfig
from bonescreen.data import (
    TASK_LABEL_COLUMN,
    ImageSource,
    normalize,
    prepare_images,
    read_manifest,
    split_rows,
    task_labels,
)
from bonescreen.distributed import DistEnv, all_gather_object, resolve_device
from bonescreen.models import GRAY_MEAN, GRAY_STD
from bonescreen.tasks import ClassificationTask, UnknownTaskError, get_task
from bonescreen.training.prepare import cpu_workers

# The schema.PREDICTION_* columns, ids and demographics before the score (spreadsheet order).
PREDICTION_ORDER = [
    "image_id",
    "patient_id",
    "site",
    "sex",
    "age",
    "t_min",
    "severity",
    "score",
    "label",
    "model",
    "split",
]


def autocast(device: torch.device, cfg: TrainConfig | None) -> Any:
    """Mixed precision as ``cfg`` asks (CUDA only; bfloat16 unless ``amp_dtype`` is float16)."""
    enabled = bool(cfg is not None and cfg.amp and device.type == "cuda")
    dtype = torch.float16 if cfg is not None and cfg.amp_dtype == "float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.inference_mode()
def infer_logits(
    model: nn.Module,
    source: ImageSource,
    indices: list[int] | np.ndarray | None = None,
    *,
    mean: float = GRAY_MEAN,
    std: float = GRAY_STD,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    flip: bool = False,
    cfg: TrainConfig | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Logits ``(len(indices), C)`` for images of ``source`` (horizontally flipped if ``flip``)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    model = model.to(device).eval()
    out: list[np.ndarray] = []
    bar = tqdm(total=len(idx), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(idx), batch_size):
        imgs = source.batch(idx[start : start + batch_size])
        if flip:
            imgs = imgs[:, :, ::-1]
        x = normalize(np.ascontiguousarray(imgs), mean, std).to(device)
        with autocast(device, cfg):
            out.append(model(x).float().cpu().numpy())
        bar.update(len(imgs))
    bar.close()
    n_classes = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def infer_logits_distributed(
    model: nn.Module, source: ImageSource, env: DistEnv, **kwargs: Any
) -> np.ndarray:
    """Each rank scores a shard; every rank gets all logits back, in source order."""
    n = len(source)
    mine = np.arange(env.rank, n, env.world_size)
    kwargs.setdefault("progress", False)
    kwargs["progress"] = kwargs["progress"] and env.is_main
    logits = infer_logits(model, source, mine, device=env.device, **kwargs)
    parts = all_gather_object((mine, logits), env)
    width = max((p[1].shape[1] for p in parts if p[1].size), default=0)
    full = np.zeros((n, width), dtype=np.float32)
    for ids, lg in parts:
        if len(ids):
            full[ids] = lg
    return full


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def _classifier(task: str) -> ClassificationTask:
    t = get_task(task)
    if not isinstance(t, ClassificationTask):
        raise UnknownTaskError(f"{task!r} is not a classifier task; its predictions are not a class table")
    return t


def tune_score_histogram(probs: np.ndarray, task: str) -> dict[str, Any]:
    """Histogram of the tuning split's ``score`` (as ``predictions_frame`` defines it) for the model card."""
    from bonescreen.evaluate.metrics import score_histogram

    scores = _classifier(task).validation_score(probs)
    return {**score_histogram(scores), "split": "tune", "n": int(len(scores))}


def predictions_frame(
    frame: pd.DataFrame,
    probs: np.ndarray,
    task: str,
    *,
    model_name: str,
    split: str | None = None,
) -> pd.DataFrame:
    """The predictions table (``schema.PREDICTION_*``) for ``frame``'s rows.

    ``score`` is the probability of the positive class; for three-class models
    it is 1 - P(normal) (any low bone density) and ``prob_<class>`` columns
    carry the full distribution.
    """
    out = pd.DataFrame({"image_id": frame["image_id"].astype(str).to_numpy()})
    for col in ("patient_id", "site", "sex", "age", "t_min", "severity"):
        if col in frame.columns:
            out[col] = frame[col].to_numpy()
    if "_y" in frame.columns:
        y = pd.to_numeric(frame["_y"], errors="coerce")
    else:
        col = TASK_LABEL_COLUMN.get(task, "label")
        y = pd.to_numeric(frame[col], errors="coerce") if col in frame.columns else pd.Series(np.nan, index=frame.index)
    y = y.to_numpy(dtype=float)
    for col, values in _classifier(task).validation_columns(probs, y).items():
        out[col] = values
    if not np.isnan(out["label"]).any():
        out["label"] = out["label"].astype(int)
    out["model"] = model_name
    out["split"] = split if split is not None else (frame["split"].to_numpy() if "split" in frame.columns else "")
    order = [c for c in PREDICTION_ORDER if c in out.columns]
    return out[order + [c for c in out.columns if c not in order]]


def predict_manifest(
    artifact: str | Path | LoadedModel,
    manifest: str | Path | pd.DataFrame,
    cache_root: str | Path,
    *,
    split: str | None = None,
    labelled_only: bool = True,
    batch_size: int = 64,
    device: str = "auto",
    model_name: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every row of a manifest (e.g. an external site) -> predictions table.

    Rows without a label for the model's task are dropped when
    ``labelled_only`` (stage-2 models are not evaluated on osteoporosis rows).
    Unreadable images are left out; their paths and reasons are in
    ``result.attrs["skipped"]`` (a list of dicts).
    """
    loaded = artifact if isinstance(artifact, LoadedModel) else load_artifact(artifact)
    task = loaded.spec.task
    frame = read_manifest(manifest)
    if split is not None:
        frame = split_rows(frame, split)
    col = TASK_LABEL_COLUMN.get(task)
    if labelled_only and col in frame.columns:
        frame = task_labels(frame, task)
    prepared = prepare_images(frame, cache_root, loaded.size, preload="false", workers=cpu_workers(), progress=progress)
    dev = resolve_device(device)
    logits = infer_logits(
        loaded.model,
        prepared.source,
        mean=float(loaded.spec.preprocess["mean"]),
        std=float(loaded.spec.preprocess["std"]),
        batch_size=batch_size,
        device=dev,
        progress=progress,
    )
    name = model_name or (Path(loaded.path).stem if loaded.path else loaded.spec.arch)
    out = predictions_frame(prepared.frame, softmax_rows(logits), task, model_name=name, split=split)
    out.attrs["skipped"] = prepared.skipped.to_dict("records")
    return out
