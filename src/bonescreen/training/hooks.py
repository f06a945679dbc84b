"""The typed interfaces between the shared training loop and a task.

Two levels:

- :class:`Evaluation` is what :func:`bonescreen.training.loop.fit` asks after
  every epoch (the metrics and the selection score: higher is better) and once
  at the end (the test split's metrics and predictions table, if the task has
  one). :mod:`bonescreen.training.selection` holds the classifier's, a callback
  one (a task's own score, e.g. the pediatric tuning Z MAE) and the
  training-loss fallback.
- :class:`TaskHooks` is what :func:`bonescreen.training.jobs.train_task` asks of
  a task: its training dataset, its loss, its evaluation and what it saves
  after the loop. :mod:`bonescreen.training.registry` maps task names to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonescreen.config import TrainConfig
from bonescreen.data import PreparedImages
from bonescreen.distributed import DistEnv

# loss_fn(model, images, the batch's other tensors) -> scalar loss
LossFn = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
# evaluate_fn(model, env) -> (metrics.csv columns, selection score: higher is better)
EvaluateFn = Callable[[nn.Module, DistEnv], tuple[dict[str, float], float]]

R_co = TypeVar("R_co", covariant=True)


class TrainDataset(Protocol):
    """What the loop reads from a training set: dict items with ``image``, per-epoch augmentation,
    and the class labels that ``balance`` (sampler weights or loss weights) uses."""

    labels: np.ndarray

    def __len__(self) -> int:
        ...

    def __getitem__(self, index: int) -> dict[str, Any]:
        ...

    def set_epoch(self, epoch: int) -> None:
        ...


@dataclass
class TrainResult:
    """What a training run produced (paths are on rank 0's file system)."""

    out_dir: Path
    artifact_path: Path
    checkpoint_path: Path
    metrics_csv: Path
    predictions_path: Path | None
    best_epoch: int | None
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    global_step: int
    stopped: str
    n_skipped_images: int = 0
    model_card: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochScore:
    """One epoch's evaluation: ``metrics.csv`` columns, the selection score and what the card keeps."""

    metrics: dict[str, Any]
    score: float
    histogram: dict[str, Any] | None = None  # the tuning scores' histogram (the card's drift reference)
    message: str = ""  # appended to the epoch's log line


class Evaluation(Protocol):
    """Model selection and the final test evaluation, as the loop calls them (on every rank)."""

    def epoch(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
              train_loss: float) -> EpochScore:
        """Score the model after an epoch (``model`` is the unwrapped one)."""
        ...

    def test(self, model: nn.Module, env: DistEnv, cfg: TrainConfig, progress: bool,
             model_name: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        """The best model's test metrics for the card and its predictions table (rank 0), or ``None``."""
        ...


class TaskHooks(Protocol[R_co]):
    """What one task gives the shared training pipeline (``training.jobs.train_task``).

    The dataset factory, the loss, the evaluation (selection metric) and what
    is saved once the loop has finished (``save`` returns the task's result).
    """

    task: str

    def train_dataset(self, prep: PreparedImages, cfg: TrainConfig) -> TrainDataset:
        ...

    def loss(self, cfg: TrainConfig) -> LossFn:
        ...

    def evaluation(self, preps: dict[str, PreparedImages], cfg: TrainConfig) -> Evaluation:
        ...

    def save(self, model: nn.Module, result: TrainResult, preps: dict[str, PreparedImages], cfg: TrainConfig,
             env: DistEnv, out: Path) -> R_co:
        """After ``fit`` (``model`` holds the best epoch's weights): the task's own outputs; returns its result."""
        ...
