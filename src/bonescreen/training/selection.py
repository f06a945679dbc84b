"""Model selection: which epoch to keep, and the evaluations ``fit`` runs after every epoch.

- :class:`ClassifierEvaluation`: the tuning split's AUC (or minus its loss),
  optionally averaged with site-shifted copies of it (``selection:
  tune_shifted``); at the end, the test split's metrics and predictions.
- :class:`CallbackEvaluation`: a task's own score (e.g. the pediatric tuning Z MAE); no test step.
- :class:`TrainLossSelection`: no tuning data; the lowest training loss wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bonescreen.config import TrainConfig
from bonescreen.data import ManifestDataset
from bonescreen.distributed import DistEnv
from bonescreen.jsonable import plain
from bonescreen.training.hooks import EpochScore, EvaluateFn, Evaluation
from bonescreen.training.inference import (
    infer_logits_distributed,
    predictions_frame,
    softmax_rows,
    tune_score_histogram,
)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Loss, AUC (macro one-vs-rest for 3 classes; NaN when a class is missing) and accuracy."""
    from sklearn.metrics import roc_auc_score

    labels = np.array(labels, dtype=np.int64)
    logits = np.array(logits, dtype=np.float32)
    if len(labels) == 0:
        return {"loss": float("nan"), "auc": float("nan"), "accuracy": float("nan")}
    loss = float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item())
    probs = softmax_rows(logits)
    n_classes = probs.shape[1]
    auc = float("nan")
    if len(np.unique(labels)) == n_classes:
        if n_classes == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    acc = float((probs.argmax(1) == labels).mean())
    return {"loss": loss, "auc": auc, "accuracy": acc}


def selection_score(metrics: dict[str, float]) -> float:
    """Higher is better: tuning AUC, or minus the loss where AUC is undefined."""
    auc = metrics.get("auc", float("nan"))
    if not math.isnan(auc):
        return auc
    loss = metrics.get("loss", float("nan"))
    return -math.inf if math.isnan(loss) else -loss


def shifted_selection_score(clean: dict[str, float], shifted_aucs: list[float]) -> tuple[dict[str, float], float]:
    """An epoch's ``tune_shifted`` score: the mean of its tune AUC and its shifted-copy AUCs.

    NaN AUCs (a single-class split) are left out; with none finite the plain
    ``tune`` score applies. Returns the ``metrics.csv`` columns and the score.
    """
    aucs = [clean.get("auc", float("nan")), *shifted_aucs]
    finite = [a for a in aucs if not math.isnan(a)]
    if not finite:
        return {}, selection_score(clean)
    shifted = [a for a in aucs[1:] if not math.isnan(a)]
    out = {
        "tune_auc_shifted": float(np.mean(shifted)) if shifted else float("nan"),
        "tune_auc_shifted_min": float(np.min(shifted)) if shifted else float("nan"),
        "tune_selection": float(np.mean(finite)),
    }
    return out, out["tune_selection"]


def evaluate_split(
    model: nn.Module, ds: ManifestDataset, env: DistEnv, cfg: TrainConfig, progress: bool, desc: str
) -> np.ndarray:
    """Logits for every image of ``ds`` (sharded over the ranks), at the evaluation batch size."""
    return infer_logits_distributed(
        model,
        ds.source,
        env,
        mean=ds.mean,
        std=ds.std,
        batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        cfg=cfg,
        progress=progress,
        desc=desc,
    )


def shifted_tune_views(tune_ds: ManifestDataset | None, cfg: TrainConfig) -> list[ManifestDataset]:
    """``selection: tune_shifted``: fixed site-shifted copies of the tune split (else none)."""
    if cfg.selection != "tune_shifted" or tune_ds is None or not len(tune_ds):
        return []
    from bonescreen.site_shift import ShiftedView

    return [
        ManifestDataset(
            ShiftedView(tune_ds.source, j, strength=cfg.site_shift_strength, seed=cfg.seed),  # type: ignore[arg-type]
            tune_ds.labels, mean=tune_ds.mean, std=tune_ds.std,
        )
        for j in range(cfg.selection_shifts)
    ]


def shifted_selection(
    model: nn.Module, tune_ds: ManifestDataset, views: list[ManifestDataset], clean: dict[str, float],
    env: DistEnv, cfg: TrainConfig,
) -> tuple[dict[str, float], float]:
    """Selection score over the tune split and its site-shifted copies: the mean AUC of all of them.

    An epoch that ranks the development site's own look well but breaks under
    another response, processing or noise level scores lower than one that
    ranks all of them well: selection stops rewarding fit to one vendor.
    """
    shifted = []
    for j, view in enumerate(views):
        logits = evaluate_split(model, view, env, cfg, False, f"tune shift {j}")
        shifted.append(classification_metrics(tune_ds.labels, logits)["auc"])
    return shifted_selection_score(clean, shifted)


def _nonempty(ds: ManifestDataset | None) -> bool:
    return ds is not None and bool(len(ds))


@dataclass
class ClassifierEvaluation:
    """Tuning AUC (+ site-shifted copies) per epoch; the test split's metrics and predictions at the end."""

    task: str
    tune_ds: ManifestDataset | None
    test_ds: ManifestDataset | None
    test_frame: pd.DataFrame
    shifted: list[ManifestDataset] = field(default_factory=list)

    def epoch(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
              train_loss: float) -> EpochScore:
        if self.tune_ds is None or not _nonempty(self.tune_ds):
            return TrainLossSelection().epoch(model, env, cfg, progress, train_loss)
        logits = evaluate_split(model, self.tune_ds, env, cfg, progress, "tune")
        m = classification_metrics(self.tune_ds.labels, logits)
        metrics: dict[str, Any] = {f"tune_{k}": v for k, v in m.items()}
        score = selection_score(m)
        hist = tune_score_histogram(softmax_rows(logits), self.task)
        if self.shifted:
            extra_m, score = shifted_selection(model, self.tune_ds, self.shifted, m, env, cfg)
            metrics.update(extra_m)
        return EpochScore(metrics, score, hist, f", tune AUC {metrics['tune_auc']:.4f}")

    def test(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
             model_name: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        if self.test_ds is None or not _nonempty(self.test_ds):
            return None, None
        logits = evaluate_split(model, self.test_ds, env, cfg, progress, "test")
        test_m = plain(classification_metrics(self.test_ds.labels, logits))
        if not env.is_main:
            return test_m, None
        preds = predictions_frame(self.test_frame, softmax_rows(logits), self.task, model_name=model_name,
                                  split="test")
        return test_m, preds


@dataclass
class CallbackEvaluation:
    """A task's own selection score (``evaluate_fn(model, env) -> (metrics, score)``); no test step.

    For models the image-only classification evaluation cannot run (e.g. the
    pediatric fusion regressor). A NaN score counts as the worst.
    """

    evaluate_fn: EvaluateFn

    def epoch(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
              train_loss: float) -> EpochScore:
        m, score = self.evaluate_fn(model, env)
        score = float(score)
        if math.isnan(score):
            score = -math.inf
        return EpochScore(plain(dict(m)), score, None, f", selection score {score:.4f}")

    def test(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
             model_name: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        return None, None


@dataclass
class LastEpochSelection:
    """Keep the last epoch (the end of the learning-rate schedule); ``inner`` still scores every epoch
    for ``metrics.csv``; no test step.

    For ensemble members (:mod:`bonescreen.training.crossfit`): their spread and Z source are fitted
    out of fold, so a tuning split would only choose the epoch, and on a few dozen children that
    choice is mostly noise (README, pediatric "Cross-fitted ensemble": a member picking epoch 5 of 12).
    """

    inner: Evaluation | None = None  # scores each epoch for metrics.csv; None: no tuning split
    epochs_seen: int = 0

    def epoch(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
              train_loss: float) -> EpochScore:
        self.epochs_seen += 1
        if self.inner is None:
            return EpochScore({}, float(self.epochs_seen))
        s = self.inner.epoch(model, env, cfg, progress, train_loss)
        return EpochScore(s.metrics, float(self.epochs_seen), s.histogram, s.message)

    def test(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
             model_name: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        return None, None


@dataclass
class TrainLossSelection:
    """No tuning data: the epoch with the lowest training loss is kept; no test step."""

    def epoch(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
              train_loss: float) -> EpochScore:
        return EpochScore({}, -train_loss)

    def test(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
             model_name: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        return None, None
