"""A run's splits: the labelled rows of each, their images in the preprocessing cache, what was skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bonescreen.config import TrainConfig
from bonescreen.data import PreparedImages, prepare_images, read_manifest, split_rows, task_labels
from bonescreen.distributed import DistEnv, barrier, broadcast_object
from bonescreen.errors import TableError
from bonescreen.training.outputs import write_frame

log = logging.getLogger(__name__)


def cpu_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prepare_split(
    frame: pd.DataFrame, cache_root: str | Path, size: int, cfg: TrainConfig, env: DistEnv, progress: bool
) -> PreparedImages:
    """Rank 0 fills the preprocessing cache; other ranks then read the same rows from it."""
    frame = frame.reset_index(drop=True).copy()
    frame["_row"] = np.arange(len(frame))
    prepared = None
    if env.is_main:
        prepared = prepare_images(
            frame, cache_root, size, preload=cfg.preload, workers=cpu_workers(), progress=progress
        )
        rows = prepared.frame["_row"].tolist()
    else:
        rows = None
    barrier(env)
    rows = broadcast_object(rows, env)
    if prepared is None:
        prepared = prepare_images(
            frame.iloc[rows], cache_root, size, preload=cfg.preload, compute=False, progress=False
        )
    return prepared


def load_splits(manifest: str | Path | pd.DataFrame, task: str) -> dict[str, pd.DataFrame]:
    """The task-labelled rows of each split; an empty training split is an error."""
    frame = task_labels(read_manifest(manifest), task)
    splits = {s: split_rows(frame, s) for s in ("train", "tune", "test")}
    if splits["train"].empty:
        raise TableError(f"manifest has no labelled 'train' rows for task {task!r}")
    if splits["train"]["_y"].nunique() < 2:
        raise TableError("the training split holds a single class; cannot train a classifier")
    if splits["tune"].empty:
        log.warning("no 'tune' split: the last epoch is kept (no model selection)")
    return splits


def check_trainable(prep: PreparedImages) -> None:
    """After unreadable images are dropped, at least two classes must remain."""
    if prep.frame.empty:
        reasons = prep.skipped["reason"].value_counts().to_dict() if len(prep.skipped) else {}
        raise TableError(f"no training image could be read (reasons: {reasons})", reason="no_data")
    if prep.frame["_y"].nunique() < 2:
        raise TableError("the readable training images hold a single class", reason="no_data")


def write_skipped(out: Path, preps: list[PreparedImages], env: DistEnv) -> int:
    skipped = pd.concat([p.skipped for p in preps], ignore_index=True) if preps else pd.DataFrame()
    if env.is_main and len(skipped):
        out.mkdir(parents=True, exist_ok=True)
        write_frame(skipped, out / "skipped.csv")
    return len(skipped)
