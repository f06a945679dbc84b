"""Pediatric training data: manifest rows with Z-scores -> image + clinical + targets.

The training stack's :class:`bonescreen.data.ManifestDataset` supplies the
(augmented, normalised) image; :class:`PediatricDataset` adds the
standardised clinical vector and the regression targets to every item, so
``bonescreen.training.loop.fit`` runs unchanged with :func:`regression_loss`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from bonescreen.data import ManifestDataset
from bonescreen.errors import TableError
from bonescreen.labels import pediatric_low_bmd
from bonescreen.pediatric.model import (
    CLINICAL_FEATURES,
    Standardizer,
    clinical_matrix,
    missing_reason,
)

log = logging.getLogger(__name__)

Z_COLUMN = "z_lumbar_spine"
BMD_COLUMN = "bmd_lumbar_spine"


def pediatric_rows(
    frame: pd.DataFrame, *, z_column: str = Z_COLUMN, bmd_column: str = BMD_COLUMN
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows usable for training/evaluation, with ``_z``, ``_bmd``, ``_y`` (low BMD) and ``_clin*``.

    Rows without a Z-score or with an incomplete clinical vector are dropped
    and counted by reason (returned), never guessed.
    """
    if z_column not in frame.columns:
        raise TableError(
            f"manifest has no {z_column!r} column: the pediatric model needs DXA Z-scores "
            "(build the cohort from a DXA export with z_* columns)",
            reason="missing_columns",
        )
    clin = clinical_matrix(frame)
    z = pd.to_numeric(frame[z_column], errors="coerce").to_numpy(dtype=float)
    bmd = (
        pd.to_numeric(frame[bmd_column], errors="coerce").to_numpy(dtype=float)
        if bmd_column in frame.columns
        else np.full(len(frame), np.nan)
    )
    reasons: Counter[str] = Counter()
    keep = np.ones(len(frame), dtype=bool)
    for i in range(len(frame)):
        if not np.isfinite(z[i]):
            reasons["no_z_score"] += 1
            keep[i] = False
            continue
        why = missing_reason(clin[i])
        if why:
            reasons[why] += 1
            keep[i] = False
    out = frame.loc[keep].copy().reset_index(drop=True)
    out["_z"] = z[keep]
    out["_bmd"] = bmd[keep]
    out["_y"] = [int(bool(pediatric_low_bmd(v))) for v in z[keep]]
    for j, name in enumerate(CLINICAL_FEATURES):
        out[f"_clin_{name}"] = clin[keep, j]
    if reasons:
        log.warning("%d row(s) left out of the pediatric set: %s", int(sum(reasons.values())), dict(reasons))
    return out, dict(reasons)


def clinical_of(frame: pd.DataFrame) -> np.ndarray:
    """The raw clinical matrix of rows returned by :func:`pediatric_rows`."""
    clinical: np.ndarray = frame[[f"_clin_{c}" for c in CLINICAL_FEATURES]].to_numpy(dtype=float)
    return clinical


def targets_of(frame: pd.DataFrame) -> np.ndarray:
    targets: np.ndarray = frame[["_z", "_bmd"]].to_numpy(dtype=float)
    return targets


class PediatricDataset(Dataset[dict[str, Any]]):
    """A ManifestDataset item plus ``clinical`` (standardised), ``target`` and ``target_mask``.

    ``labels`` (low BMD, 0/1) is exposed so the training loop's class-balanced
    sampler (``balance: sampler``) works unchanged.
    """

    def __init__(
        self, images: ManifestDataset, clinical_raw: np.ndarray, targets_raw: np.ndarray, standardizer: Standardizer
    ) -> None:
        if not (len(images) == len(clinical_raw) == len(targets_raw)):
            raise ValueError(f"{len(images)} images, {len(clinical_raw)} clinical rows, {len(targets_raw)} targets")
        self.images = images
        self.clinical = standardizer.clinical(clinical_raw)
        t = standardizer.targets(targets_raw)
        self.mask = np.isfinite(t).astype(np.float32)
        self.targets = np.nan_to_num(t).astype(np.float32)
        self.labels = images.labels
        self.source = images.source
        self.mean, self.std = images.mean, images.std

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.images[index]
        item["clinical"] = torch.from_numpy(self.clinical[index])
        item["target"] = torch.from_numpy(self.targets[index])
        item["target_mask"] = torch.from_numpy(self.mask[index])
        return item


def regression_loss(bmd_weight: float = 0.5):  # type: ignore[no-untyped-def]
    """``loss_fn(model, x, batch)`` for ``bonescreen.training.loop.fit``: MSE on standardised Z (+ weighted BMD).

    Missing BMD values are masked out; Z is always present (rows without it
    never reach the dataset).
    """
    w = torch.tensor([1.0, float(bmd_weight)])

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(x, batch["clinical"]).float()
        mask = batch["target_mask"].float()
        err = (pred - batch["target"].float()) ** 2 * mask * w.to(pred.device)
        loss: torch.Tensor = err.sum() / (mask * w.to(pred.device)).sum().clamp_min(1.0)
        return loss

    return loss_fn
