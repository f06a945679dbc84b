"""Proxy labels for an unlabelled pool: keep only images the teacher is confident about.

The paper keeps a pool image as normal when P(normal) >= 0.99 and as low
bone mass when P(low bone mass) >= 0.75 (thresholds set from the training
class balance; Table S3 compares 0.65 / 0.75 / 0.85). Everything else is
excluded. Outputs, next to ``out_csv``:

    <out>.csv          kept images: a manifest the ``distill`` step reads
    <out>.scores.csv   every scored image with its probabilities (for threshold studies)
    <out>.counts.json  kept / excluded per class, unreadable files and reasons
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen.artifact import LoadedModel, load_artifact
from bonescreen.data import TASK_LABEL_COLUMN, PreparedImages, prepare_images, read_manifest
from bonescreen.distributed import DistEnv, barrier, cleanup, init_distributed
from bonescreen.errors import TableError
from bonescreen.training.inference import infer_logits_distributed, softmax_rows
from bonescreen.training.prepare import cpu_workers
from bonescreen.walk import walk_files

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


@dataclass
class PseudoLabelResult:
    out_csv: Path
    scores_csv: Path
    counts_json: Path
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int(sum(c["kept"] for c in self.counts["classes"].values()))


def select_proxy_labels(
    probs: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Assign each image its most probable class; keep it if that probability >= the class threshold.

    ``probs`` is ``(N, C)`` (rows sum to 1), ``thresholds`` one per class.
    Returns ``(classes, keep)``. A threshold below 0.5 on a binary task could
    let both classes qualify; the most probable class wins then.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    th = np.asarray(thresholds, dtype=np.float64)
    if th.shape != (probs.shape[1],):
        raise ValueError(f"{len(th)} thresholds for {probs.shape[1]} classes")
    if ((th < 0) | (th > 1)).any():
        raise ValueError(f"thresholds must be in [0, 1], got {th.tolist()}")
    cls = probs.argmax(axis=1)
    keep = probs[np.arange(len(probs)), cls] >= th[cls] if len(probs) else np.zeros(0, bool)
    return cls, keep


def pool_frame(pool: str | Path | pd.DataFrame | Sequence[str | Path]) -> pd.DataFrame:
    """A pool as rows with ``path``: a manifest CSV/DataFrame, a folder (searched recursively) or paths."""
    if isinstance(pool, pd.DataFrame):
        return read_manifest(pool)
    if isinstance(pool, (str, Path)):
        p = Path(pool)
        if p.is_dir():
            # the one folder walker (hidden names skipped, folder links not followed), as screen and cohort
            files = sorted(f for f in walk_files(p) if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise TableError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {p}")
            return read_manifest(pd.DataFrame({"path": [str(f) for f in files]}))
        if p.suffix.lower() == ".csv":
            return read_manifest(p)
        pool = [p]
    frame = pd.DataFrame({"path": [str(x) for x in pool]})
    if frame.empty:
        raise TableError("the pool is empty")
    return read_manifest(frame)


def score_pool(loaded: LoadedModel, frame: pd.DataFrame, cache_root: str | Path, batch_size: int, env: DistEnv,
               progress: bool) -> tuple[PreparedImages, np.ndarray]:
    """The pool's readable images (rank 0 fills the cache) and the teacher's probabilities, sharded over ranks."""
    if env.is_main:
        prepared = prepare_images(
            frame, cache_root, loaded.size, preload="false", workers=cpu_workers(), progress=progress
        )
    barrier(env)
    if not env.is_main:
        prepared = prepare_images(frame, cache_root, loaded.size, preload="false", compute=False, progress=False)
    logits = infer_logits_distributed(
        loaded.model,
        prepared.source,
        env,
        mean=float(loaded.spec.preprocess["mean"]),
        std=float(loaded.spec.preprocess["std"]),
        batch_size=batch_size,
        progress=progress,
        desc="pseudolabel",
    )
    probs = softmax_rows(logits) if len(logits) else np.zeros((0, len(loaded.spec.class_names)))
    return prepared, probs


def proxy_tables(loaded: LoadedModel, prepared: PreparedImages, probs: np.ndarray, cls: np.ndarray,
                 keep: np.ndarray, site: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every scored image with its probabilities, the kept images as training rows with proxy labels)."""
    names = list(loaded.spec.class_names)
    scored = prepared.frame.copy()
    if "site" not in scored.columns:
        scored["site"] = site
    for j, name in enumerate(names):
        scored[f"prob_{name}"] = probs[:, j]
    scored["proxy_class"] = [names[c] for c in cls]
    scored["proxy_confidence"] = probs[np.arange(len(probs)), cls] if len(probs) else []
    scored["kept"] = keep.astype(int)
    kept = scored.loc[keep].copy()
    label_col = TASK_LABEL_COLUMN[loaded.spec.task]
    kept[label_col] = cls[keep]
    if label_col != "label":  # the proxy label is another task's: the stage-2 label column stays empty
        kept["label"] = np.nan
    kept["split"] = "train"
    kept["proxy"] = 1
    kept["score"] = probs[keep][:, loaded.spec.positive_class] if loaded.spec.num_classes == 2 else np.nan
    return scored, kept


def proxy_counts(loaded: LoadedModel, thresholds: Sequence[float], n_pool: int, prepared: PreparedImages,
                 cls: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Kept / excluded per class, unreadable files and their reasons (``<out>.counts.json``)."""
    names = list(loaded.spec.class_names)
    counts: dict[str, Any] = {
        "model": Path(loaded.path).name if loaded.path else loaded.spec.arch,
        "task": loaded.spec.task,
        "thresholds": {n: float(t) for n, t in zip(names, thresholds)},
        "n_pool": n_pool,
        "n_scored": len(prepared.frame),
        "n_unreadable": len(prepared.skipped),
        "unreadable_reasons": dict(Counter(prepared.skipped["reason"]).most_common()),
        "classes": {
            n: {"kept": int(((cls == j) & keep).sum()), "excluded": int(((cls == j) & ~keep).sum())}
            for j, n in enumerate(names)
        },
    }
    counts["n_kept"] = int(keep.sum())
    counts["n_excluded"] = int((~keep).sum())
    return counts


def pseudolabel(
    model_artifact: str | Path | LoadedModel,
    pool: str | Path | pd.DataFrame | Sequence[str | Path],
    out_csv: str | Path,
    *,
    thresholds: Sequence[float] = (0.99, 0.75),
    cache_root: str | Path,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    site: str = "pool",
) -> PseudoLabelResult:
    """Score the pool with the teacher, keep confident images, write the proxy manifest.

    Runs under ``torchrun`` too: each process scores a shard, rank 0 writes.
    """
    env = init_distributed(device)
    try:
        loaded = (
            model_artifact
            if isinstance(model_artifact, LoadedModel)
            else load_artifact(model_artifact, device="cpu")
        )
        names = list(loaded.spec.class_names)
        if len(thresholds) != len(names):
            raise TableError(
                f"{len(thresholds)} thresholds given for the {len(names)} classes {names} of this model"
            )
        frame = pool_frame(pool)
        prepared, probs = score_pool(loaded, frame, cache_root, batch_size, env, progress)
        cls, keep = select_proxy_labels(probs, thresholds)

        out_csv = Path(out_csv)
        stem = out_csv.with_suffix("")
        scores_csv = Path(f"{stem}.scores.csv")
        counts_json = Path(f"{stem}.counts.json")
        scored, kept = proxy_tables(loaded, prepared, probs, cls, keep, site)
        counts = proxy_counts(loaded, thresholds, len(frame), prepared, cls, keep)
        if env.is_main:
            out_csv.parent.mkdir(parents=True, exist_ok=True)
            kept.to_csv(out_csv, index=False)
            scored.to_csv(scores_csv, index=False)
            counts_json.write_text(json.dumps(counts, indent=1))
            per = ", ".join(f"{n}: {c['kept']} kept / {c['excluded']} excluded" for n, c in counts["classes"].items())
            log.info("pseudo-labels: %d of %d pool images kept (%s)", counts["n_kept"], len(frame), per)
        barrier(env)
        return PseudoLabelResult(out_csv, scores_csv, counts_json, counts)
    finally:
        cleanup(env)
