"""Knowledge distillation: a student on labelled + proxy-labelled images.

Loss per image (``alpha`` = weight of the distillation term, ``T`` = temperature)::

    (1 - alpha) * CE(student, hard label) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

the hard label being the DXA label, or the proxy label for pool images. This
is timm's ``LogitDistillationTask`` loss in its complementary mode
(``task_loss_weight = 1 - alpha``); it is written out here because timm's task
feeds teacher and student the same tensor, while the paper's recipe gives the
student the *strongly* augmented view and the teacher the *weak* one
(noisy-student style).

Teacher targets are precomputed: the weak view is the image flipped or not,
so the frozen teacher's logits are computed once for both orientations and
each sample picks the one matching the flip its strong view got. This is
exactly what running the teacher on the weak view at every step would give,
at a fraction of the cost (no teacher forward per step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bonescreen.artifact import load_artifact
from bonescreen.config import TrainConfig, load_config
from bonescreen.data import (
    TASK_LABEL_COLUMN,
    ImageSource,
    ManifestDataset,
    PreparedImages,
    read_manifest,
    task_labels,
)
from bonescreen.distributed import DistEnv, cleanup, init_distributed
from bonescreen.errors import TableError
from bonescreen.site_shift import from_config as site_shift_from_config
from bonescreen.training.checkpoint import seed_everything
from bonescreen.training.hooks import LossFn, TrainResult
from bonescreen.training.inference import infer_logits_distributed
from bonescreen.training.jobs import ClassifierHooks, make_spec, model_card, train_task
from bonescreen.training.model import build_model
from bonescreen.training.prepare import check_trainable, load_splits, prepare_split, write_skipped

log = logging.getLogger(__name__)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student), batch mean."""
    t = float(temperature)
    ce = F.cross_entropy(student_logits, target, weight=weight)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(student_logits.dtype) / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - alpha) * ce + alpha * kl


def distill_loss_fn(alpha: float, temperature: float) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return distillation_loss(
            model(x).float(),
            batch["teacher"].float(),
            batch["label"],
            alpha=alpha,
            temperature=temperature,
            weight=batch.get("class_weight"),
        )

    return loss_fn


def teacher_soft_targets(
    teacher: Any, source: ImageSource, env: DistEnv, cfg: TrainConfig, progress: bool
) -> np.ndarray:
    """Teacher logits ``(N, 2, C)``: index 0 on the image as is, 1 on its mirror image."""
    kw = {
        "mean": float(teacher.spec.preprocess["mean"]),
        "std": float(teacher.spec.preprocess["std"]),
        "batch_size": cfg.eval_batch_size or 2 * cfg.batch_size,
        "cfg": cfg,
        "progress": progress,
    }
    plain = infer_logits_distributed(teacher.model, source, env, desc="teacher", **kw)
    mirror = infer_logits_distributed(teacher.model, source, env, flip=True, desc="teacher (flipped)", **kw)
    return np.stack([plain, mirror], axis=1).astype(np.float32)


def read_proxy(proxy: str | Path | pd.DataFrame, task: str) -> pd.DataFrame:
    """Proxy-labelled pool rows (from ``pseudolabel``) as training rows."""
    frame = read_manifest(proxy)
    col = TASK_LABEL_COLUMN[task]
    if col not in frame.columns:
        raise TableError(f"proxy manifest has no {col!r} column for task {task!r}")
    frame = task_labels(frame, task)
    frame["split"] = "train"
    frame["proxy"] = 1
    if "site" not in frame.columns:
        frame["site"] = "pool"
    return frame


@dataclass
class DistillHooks(ClassifierHooks):
    """A classifier task trained as a student: the strong view against the teacher's precomputed logits."""

    soft_targets: np.ndarray | None = None

    def train_dataset(self, prep: PreparedImages, cfg: TrainConfig) -> ManifestDataset:
        return ManifestDataset(
            prep.source,
            prep.frame["_y"].to_numpy(),
            augment=cfg.student_augment,
            strong_p=cfg.strong_p,
            seed=cfg.seed,
            soft_targets=self.soft_targets,
            site_shift=site_shift_from_config(cfg),
        )

    def loss(self, cfg: TrainConfig) -> LossFn:
        return distill_loss_fn(cfg.distill_alpha, cfg.distill_temperature)


def student_splits(manifest: str | Path | pd.DataFrame, proxy: str | Path | pd.DataFrame | None, task: str,
                   cache_root: str | Path, cfg: TrainConfig, env: DistEnv, progress: bool) -> dict[str, PreparedImages]:
    """The labelled splits, the proxy-labelled pool rows added to ``train`` (``proxy`` 1), prepared."""
    splits = load_splits(manifest, task)
    train = splits["train"].copy()
    train["proxy"] = 0
    if proxy is not None:
        extra = read_proxy(proxy, task)
        train = pd.concat([train, extra], ignore_index=True, sort=False)
    return {
        "train": prepare_split(train, cache_root, cfg.image_size, cfg, env, progress),
        "tune": prepare_split(splits["tune"], cache_root, cfg.image_size, cfg, env, progress),
        "test": prepare_split(splits["test"], cache_root, cfg.image_size, cfg, env, progress),
    }


def train_soft_targets(loaded: Any, train: PreparedImages, cache_root: str | Path, cfg: TrainConfig, env: DistEnv,
                       progress: bool) -> tuple[np.ndarray, float]:
    """The teacher's logits on the training images (at the teacher's input size) and its accuracy on them."""
    train_frame = train.frame
    if loaded.size == cfg.image_size:
        teacher_source = train.source
    else:
        teacher_prep = prepare_split(train_frame.drop(columns="_row"), cache_root, loaded.size, cfg, env, progress)
        if len(teacher_prep.frame) != len(train_frame):
            raise TableError("teacher and student preprocessing kept different images")
        teacher_source = teacher_prep.source
    soft = teacher_soft_targets(loaded, teacher_source, env, cfg, progress)
    teacher_probs = torch.softmax(torch.from_numpy(soft[:, 0]), dim=1).numpy()
    y = train_frame["_y"].to_numpy()
    agreement = float((teacher_probs.argmax(1) == y).mean()) if len(y) else float("nan")
    return soft, agreement


def distill(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    teacher: str | Path,
    cache_root: str | Path,
    proxy: str | Path | pd.DataFrame | None = None,
    task: str = "stage2",
    resume: bool = False,
    model_name: str = "student",
) -> TrainResult:
    """Train a student on labelled + proxy-labelled data against the teacher's soft targets.

    Model selection, checkpoints, early stopping and outputs are those of
    :func:`bonescreen.training.jobs.train_model`. ``proxy=None`` distils on the
    labelled data alone.
    """
    cfg = (config or load_config("cpu-tiny")).validate()
    env = init_distributed(cfg.device)
    try:
        out = Path(out_dir)
        progress = cfg.progress and env.is_main
        loaded = load_artifact(teacher, expected_task=task, device="cpu")
        preps = student_splits(manifest, proxy, task, cache_root, cfg, env, progress)
        check_trainable(preps["train"])
        n_skipped = write_skipped(out, list(preps.values()), env)
        soft, agreement = train_soft_targets(loaded, preps["train"], cache_root, cfg, env, progress)

        spec = make_spec(cfg, task)
        seed_everything(cfg.seed)
        model, pretrained_desc = build_model(cfg, spec.num_classes)
        teacher_card = {
            "arch": loaded.spec.arch,
            "file": Path(teacher).name,
            "image_size": loaded.size,
            "tune_metrics": loaded.spec.model_card.get("tune_metrics", {}),
            "train_agreement": agreement,
        }
        distillation = {
            "alpha": cfg.distill_alpha,
            "temperature": cfg.distill_temperature,
            "student_augment": cfg.student_augment,
            "teacher_view": "weak (flip only), precomputed",
        }
        card = model_card("distilled", model_name, cfg, pretrained_desc, spec, preps, n_skipped,
                          teacher=teacher_card, distillation=distillation)
        return train_task(DistillHooks(task, soft_targets=soft), spec=spec, model=model, card=card, preps=preps,
                          out=out, cfg=cfg, env=env, resume=resume, model_name=model_name, n_skipped=n_skipped)
    finally:
        cleanup(env)
