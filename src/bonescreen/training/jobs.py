"""Training jobs on the shared loop: ``train_task`` (any task's hooks) and ``train_model`` (the teacher).

``train_model`` trains a classifier (stage1, stage2, three_class) on the
manifest's ``train`` split, selects the epoch with the best AUC on the
``tune`` split and writes, besides what ``fit`` writes (see
:mod:`bonescreen.training.loop`), ``predictions.csv`` (the test split, in the
format ``evaluate`` reads) and ``skipped.csv`` (images that could not be read,
with the reason); the artifact ends with its out-of-distribution part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from torch import nn

from bonescreen import __version__
from bonescreen.artifact import ModelSpec
from bonescreen.config import TrainConfig, load_config
from bonescreen.data import ManifestDataset, PreparedImages
from bonescreen.distributed import DistEnv, barrier, cleanup, init_distributed
from bonescreen.models import GRAY_MEAN, GRAY_STD
from bonescreen.site_shift import from_config as site_shift_from_config
from bonescreen.tasks import get_task
from bonescreen.training.checkpoint import seed_everything
from bonescreen.training.hooks import LossFn, TaskHooks, TrainResult
from bonescreen.training.loop import TrainJob, fit
from bonescreen.training.model import build_model
from bonescreen.training.outputs import data_summary
from bonescreen.training.prepare import check_trainable, load_splits, prepare_split, write_skipped
from bonescreen.training.selection import ClassifierEvaluation, shifted_tune_views

R = TypeVar("R")


def train_task(hooks: TaskHooks[R], *, spec: ModelSpec, model: nn.Module, card: dict[str, Any],
               preps: dict[str, PreparedImages], out: Path, cfg: TrainConfig, env: DistEnv, resume: bool,
               model_name: str, n_skipped: int = 0) -> R:
    """The shared pipeline after data and model exist: the task's dataset, loss and evaluation, ``fit``, its save."""
    job = TrainJob(
        task=hooks.task,
        spec=spec,
        model=model,
        train_ds=hooks.train_dataset(preps["train"], cfg),
        loss_fn=hooks.loss(cfg),
        evaluation=hooks.evaluation(preps, cfg),
        model_card=card,
        model_name=model_name,
        n_skipped_images=n_skipped,
    )
    result = fit(job, out, cfg, env, resume=resume)
    return hooks.save(model, result, preps, cfg, env, out)


def make_spec(cfg: TrainConfig, task: str) -> ModelSpec:
    return ModelSpec.for_task(
        cfg.arch,
        task,
        preprocess={"method": "truncation", "size": int(cfg.image_size), "mean": GRAY_MEAN, "std": GRAY_STD},
        threshold=float(cfg.threshold),
    )


def model_card(
    kind: str,
    model_name: str,
    cfg: TrainConfig,
    pretrained_desc: str,
    spec: ModelSpec,
    preps: dict[str, PreparedImages],
    n_skipped: int,
    **extra: Any,
) -> dict[str, Any]:
    """The artifact's model card; ``extra`` (e.g. the teacher) goes after the model description."""
    return {
        "kind": kind,
        "model_name": model_name,
        "preset": cfg.preset,
        "arch": cfg.arch,
        "pretrained": pretrained_desc,
        "image_size": cfg.image_size,
        **extra,
        "training_data": {s: data_summary(p.frame, spec.class_names) for s, p in preps.items()},
        "skipped_images": n_skipped,
        "config": cfg.to_dict(),
        "bonescreen_version": __version__,
    }


def classifier_evaluation(task: str, preps: dict[str, PreparedImages], cfg: TrainConfig) -> ClassifierEvaluation:
    """Selection on the prepared ``tune`` split (+ shifted copies), test predictions on ``test``."""

    def eval_ds(name: str) -> ManifestDataset | None:
        p = preps[name]
        return ManifestDataset(p.source, p.frame["_y"].to_numpy()) if len(p.frame) else None

    tune_ds, test_ds = eval_ds("tune"), eval_ds("test")
    return ClassifierEvaluation(task, tune_ds, test_ds, preps["test"].frame, shifted_tune_views(tune_ds, cfg))


def fit_artifact_ood(artifact_path: Path, preps: dict[str, PreparedImages], train_labels: np.ndarray | None,
                     cfg: TrainConfig, env: DistEnv) -> None:
    """The last training step: the OOD part (bonescreen.ood) fitted on the training split's
    features with its threshold on the tuning split, written into the artifact (rank 0)."""
    if env.is_main:
        from bonescreen.ood import attach_ood

        attach_ood(artifact_path, preps["train"].source, train_labels, preps["tune"].source,
                   quantile=cfg.ood_quantile)
    barrier(env)


@dataclass
class ClassifierHooks:
    """stage1 / stage2 / three_class: images and labels, cross-entropy, tuning AUC, OOD part at the end."""

    task: str

    def train_dataset(self, prep: PreparedImages, cfg: TrainConfig) -> ManifestDataset:
        return get_task(self.task).dataset(  # type: ignore[no-any-return]
            prep.source, prep.frame["_y"].to_numpy(), augment=cfg.augment, strong_p=cfg.strong_p,
            seed=cfg.seed, site_shift=site_shift_from_config(cfg),
        )

    def loss(self, cfg: TrainConfig) -> LossFn:
        return get_task(self.task).loss(label_smoothing=cfg.label_smoothing)

    def evaluation(self, preps: dict[str, PreparedImages], cfg: TrainConfig) -> ClassifierEvaluation:
        return classifier_evaluation(self.task, preps, cfg)

    def save(self, model: nn.Module, result: TrainResult, preps: dict[str, PreparedImages], cfg: TrainConfig,
             env: DistEnv, out: Path) -> TrainResult:
        fit_artifact_ood(result.artifact_path, preps, preps["train"].frame["_y"].to_numpy(), cfg, env)
        return result


def train_model(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_root: str | Path,
    task: str = "stage2",
    resume: bool = False,
    model_name: str = "teacher",
) -> TrainResult:
    """Train a supervised model (the teacher) on the manifest's train split."""
    cfg = (config or load_config("cpu-tiny")).validate()
    env = init_distributed(cfg.device)
    try:
        out = Path(out_dir)
        splits = load_splits(manifest, task)
        preps = {
            s: prepare_split(f, cache_root, cfg.image_size, cfg, env, cfg.progress and env.is_main)
            for s, f in splits.items()
        }
        check_trainable(preps["train"])
        n_skipped = write_skipped(out, list(preps.values()), env)
        spec = make_spec(cfg, task)
        seed_everything(cfg.seed)
        model, pretrained_desc = build_model(cfg, spec.num_classes)
        card = model_card("supervised", model_name, cfg, pretrained_desc, spec, preps, n_skipped)
        return train_task(ClassifierHooks(task), spec=spec, model=model, card=card, preps=preps, out=out, cfg=cfg,
                          env=env, resume=resume, model_name=model_name, n_skipped=n_skipped)
    finally:
        cleanup(env)
