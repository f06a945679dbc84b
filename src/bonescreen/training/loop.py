"""The shared training loop: ``fit`` trains a :class:`TrainJob` with checkpoints, model selection
and early stopping, and writes into ``out_dir``:

    model.pt         the single-file artifact (best epoch, model card)
    checkpoint.pt    last state: weights, optimizer, scheduler, scaler, RNG, step
    metrics.csv      one row per epoch: loss, selection metrics, learning rate, images/s
    predictions.csv  the test split, when the job's evaluation has one
    tensorboard/     the same curves for TensorBoard

AdamW (timm) with linear warm-up and a cosine schedule stepped per batch,
autocast + GradScaler under ``amp`` on CUDA, one optimiser step per batch.
It runs unchanged under ``torchrun --nproc_per_node N`` (DDP; ``batch_size``
is the global batch, split across processes; only rank 0 writes files).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bonescreen.artifact import ModelSpec, save_artifact
from bonescreen.config import TrainConfig
from bonescreen.data import EpochSampler, balanced_weights, class_weights
from bonescreen.distributed import DistEnv, all_gather_object, all_reduce_sum, barrier, broadcast_object, state_checksum
from bonescreen.errors import BonescreenError
from bonescreen.jsonable import plain
from bonescreen.training.checkpoint import LoopState, Optimisation, save_checkpoint, start_state
from bonescreen.training.hooks import EpochScore, Evaluation, LossFn, TrainDataset, TrainResult
from bonescreen.training.inference import autocast
from bonescreen.training.outputs import spec_with_card, write_csv, write_frame

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything ``fit`` needs: model, data, the loss to minimise and how epochs are scored.

    ``train_ds`` items are dicts with ``image`` and the tensors ``loss_fn``
    reads; its ``labels`` feed ``balance``.
    """

    task: str
    spec: ModelSpec
    model: nn.Module
    train_ds: TrainDataset
    loss_fn: LossFn
    evaluation: Evaluation
    model_card: dict[str, Any]
    model_name: str = "model"
    n_skipped_images: int = 0


@dataclass
class RunPaths:
    out: Path
    checkpoint: Path
    artifact: Path
    metrics_csv: Path

    @classmethod
    def under(cls, out: Path) -> RunPaths:
        return cls(out, out / "checkpoint.pt", out / "model.pt", out / "metrics.csv")


@dataclass
class Trainer:
    """The objects one run trains with (built once per run)."""

    opt: Optimisation
    wrapped: nn.Module  # DDP around opt.model, or the model itself
    loader: DataLoader[Any]
    sampler: EpochSampler
    loader_gen: torch.Generator
    per_rank: int
    steps_per_epoch: int
    batch_extra: dict[str, torch.Tensor]


@dataclass
class EpochStats:
    loss_sum: float
    seen: int
    seconds: float
    hit_max_steps: bool


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then a cosine down to ``min_ratio`` of it (per optimiser step)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def fit(job: TrainJob, out_dir: str | Path, cfg: TrainConfig, env: DistEnv, *, resume: bool = False) -> TrainResult:
    """Train with checkpoints, model selection (``job.evaluation``) and early stopping."""
    threads = torch.get_num_threads()
    if cfg.num_threads and env.device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    try:
        return run_fit(job, Path(out_dir), cfg, env, resume=resume)
    finally:
        torch.set_num_threads(threads)


def build_trainer(job: TrainJob, cfg: TrainConfig, env: DistEnv) -> Trainer:
    """Model on the device (DDP-wrapped when distributed), sampler, loader, optimiser, schedule, scaler."""
    from timm.optim import create_optimizer_v2  # type: ignore[attr-defined]
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = env.device
    cuda = device.type == "cuda"
    model = job.model.to(device)
    if cfg.channels_last and cuda:
        model = model.to(memory_format=torch.channels_last)
    wrapped = DDP(model, device_ids=[device.index] if cuda else None) if env.distributed else model

    per_rank = max(1, cfg.batch_size // env.world_size)
    weights = balanced_weights(job.train_ds.labels) if cfg.balance == "sampler" else None
    sampler = EpochSampler(
        len(job.train_ds), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, weights=weights
    )
    drop_last = sampler.num_samples >= per_rank
    steps_per_epoch = sampler.num_samples // per_rank if drop_last else 1
    loader_gen = torch.Generator()
    loader: DataLoader[dict[str, Any]] = DataLoader(
        job.train_ds, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers,  # type: ignore[arg-type]
        drop_last=drop_last, pin_memory=cuda, generator=loader_gen,
    )

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp and cfg.amp_dtype == "float16")
    extra: dict[str, torch.Tensor] = {}
    if cfg.balance == "loss":
        extra["class_weight"] = torch.as_tensor(
            class_weights(job.train_ds.labels, job.spec.num_classes), dtype=torch.float32, device=device
        )
    return Trainer(Optimisation(model, optimizer, scheduler, scaler), wrapped, loader, sampler, loader_gen,
                   per_rank, steps_per_epoch, extra)


def _tensorboard(paths: RunPaths, cfg: TrainConfig, env: DistEnv, state: LoopState, resume: bool) -> Any:
    if not (env.is_main and cfg.tensorboard):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(paths.out / "tensorboard"), purge_step=state.global_step if resume else None)
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard is not installed; curves are only in %s", paths.metrics_csv)
        return None


def run_fit(job: TrainJob, out: Path, cfg: TrainConfig, env: DistEnv, *, resume: bool) -> TrainResult:
    """Set up, train epoch by epoch (select, log, checkpoint, stop), then write the best model."""
    paths = RunPaths.under(out)
    progress = cfg.progress and env.is_main
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tr = build_trainer(job, cfg, env)
    state = start_state(paths.checkpoint, tr.opt, cfg, env, resume=resume)
    writer = _tensorboard(paths, cfg, env, state, resume)
    t_run = time.perf_counter()
    while state.epoch < cfg.epochs and not state.early_stopped:
        stats = run_epoch(job, tr, state, paths, cfg, env, progress, writer)
        if stats is None:  # resumed exactly at an epoch end
            continue
        record = epoch_record(tr, state, stats, env)
        scored = job.evaluation.epoch(tr.opt.model, env, cfg, progress, record["train_loss"])
        record.update(scored.metrics)
        select_epoch(job, tr, state, record, scored, paths, env)
        log_epoch(record, scored, state, paths, env, writer)
        if end_of_epoch(tr, state, record, stats, paths, job, cfg, env, t_run):
            break
    if state.early_stopped:
        state.stopped = "early_stopping"
    if writer is not None:
        writer.close()
    check_ranks_agree(tr.opt.model, out, env)
    return finish_run(job, tr.opt.model, state, paths, cfg, env, progress)


def run_epoch(job: TrainJob, tr: Trainer, state: LoopState, paths: RunPaths, cfg: TrainConfig, env: DistEnv,
              progress: bool, writer: Any) -> EpochStats | None:
    """One epoch (or what is left of it after a resume); ``None`` when nothing was left."""
    from tqdm.auto import tqdm

    job.train_ds.set_epoch(state.epoch)
    tr.sampler.set_epoch(state.epoch)
    tr.sampler.set_start(state.step_in_epoch * tr.per_rank)
    tr.loader_gen.manual_seed(cfg.seed + state.epoch)
    tr.wrapped.train()
    t0 = time.perf_counter()
    bar = tqdm(total=tr.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               unit="step", disable=not progress, leave=False)
    if state.step_in_epoch >= tr.steps_per_epoch:
        bar.close()
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        return None
    try:
        loss_sum, seen, hit_max_steps = train_steps(job, tr, state, paths, cfg, env, bar, writer)
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(paths.checkpoint, tr.opt, state, job.task, cfg, env, "interrupted")
        log.warning("interrupted at step %d; resume with --resume", state.global_step)
        raise
    bar.close()
    if seen == 0:
        raise BonescreenError(f"epoch {state.epoch + 1} produced no training batch", reason="no_data")
    return EpochStats(loss_sum, seen, time.perf_counter() - t0, hit_max_steps)


def train_steps(job: TrainJob, tr: Trainer, state: LoopState, paths: RunPaths, cfg: TrainConfig, env: DistEnv,
                bar: Any, writer: Any) -> tuple[float, int, bool]:
    """The optimiser steps of one epoch -> (sum of loss x images, images seen, whether max_steps was hit)."""
    device = env.device
    cuda = device.type == "cuda"
    opt = tr.opt
    loss_sum, seen = 0.0, 0
    for batch in tr.loader:
        if state.step_in_epoch >= tr.steps_per_epoch:
            break
        x = batch["image"].to(device, non_blocking=True)
        if cfg.channels_last and cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "image"}
        b.update(tr.batch_extra)
        with autocast(device, cfg):
            loss = job.loss_fn(tr.wrapped, x, b)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        if cfg.grad_clip:
            opt.scaler.unscale_(opt.optimizer)
            nn.utils.clip_grad_norm_(opt.model.parameters(), cfg.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise BonescreenError(
                f"training loss became {loss_value} at step {state.global_step}; lower lr or turn off amp",
                reason="diverged",
            )
        loss_sum += loss_value * len(x)
        seen += len(x)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if writer is not None and state.global_step % 10 == 0:
            writer.add_scalar("train/loss_step", loss_value, state.global_step)
        if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
            save_checkpoint(paths.checkpoint, opt, state, job.task, cfg, env)
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            return loss_sum, seen, True
    return loss_sum, seen, False


def epoch_record(tr: Trainer, state: LoopState, stats: EpochStats, env: DistEnv) -> dict[str, Any]:
    """The epoch's metrics.csv row before evaluation (losses summed over the ranks)."""
    loss_total, seen_total = all_reduce_sum([stats.loss_sum, float(stats.seen)], env)
    seconds = stats.seconds
    return {
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "partial": state.step_in_epoch < tr.steps_per_epoch,
        "train_loss": loss_total / seen_total if seen_total else float("nan"),
        "lr": tr.opt.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 3),
        "images_per_s": seen_total / seconds if seconds > 0 else float("nan"),
    }


def select_epoch(job: TrainJob, tr: Trainer, state: LoopState, record: dict[str, Any], scored: EpochScore,
                 paths: RunPaths, env: DistEnv) -> None:
    """Keep the epoch if it scores best so far (artifact written); count epochs without improvement."""
    best = state.best
    improved = broadcast_object(best is None or scored.score > best["score"], env)
    if improved:
        state.best = {"score": float(scored.score), "epoch": state.epoch + 1, "step": state.global_step,
                      "metrics": plain(record), "tune_score_histogram": scored.histogram}
        state.bad_epochs = 0
        if env.is_main:
            card = dict(job.model_card)
            card["tune_metrics"] = plain(record)
            save_artifact(paths.artifact, tr.opt.model, spec_with_card(job.spec, card))
    elif not record["partial"]:
        state.bad_epochs += 1
    record["best"] = bool(improved)
    state.history.append(plain(record))


def log_epoch(record: dict[str, Any], scored: EpochScore, state: LoopState, paths: RunPaths, env: DistEnv,
              writer: Any) -> None:
    """The epoch's log line, metrics.csv and TensorBoard scalars (rank 0)."""
    if not env.is_main:
        return
    log.info("epoch %d%s: train loss %.4f%s, %.1f img/s", record["epoch"], " (partial)" if record["partial"] else "",
             record["train_loss"], scored.message, record["images_per_s"])
    write_csv(state.history, paths.metrics_csv)
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step", "partial", "best"):
                writer.add_scalar(k.replace("_", "/", 1), v, state.global_step)
        writer.flush()


def end_of_epoch(tr: Trainer, state: LoopState, record: dict[str, Any], stats: EpochStats, paths: RunPaths,
                 job: TrainJob, cfg: TrainConfig, env: DistEnv, t_run: float) -> bool:
    """Advance, apply early stopping / max_steps / max_minutes, checkpoint; True when the run stops here."""
    if not record["partial"]:
        state.epoch += 1
        state.step_in_epoch = 0
    if cfg.early_stopping_patience and state.bad_epochs >= cfg.early_stopping_patience:
        state.early_stopped = True
        state.stopped = "early_stopping"
    elapsed_min = (time.perf_counter() - t_run) / 60
    if stats.hit_max_steps:
        state.stopped = "max_steps"
    elif cfg.max_minutes is not None and broadcast_object(elapsed_min >= cfg.max_minutes, env):
        state.stopped = "max_minutes"
    stopped = state.stopped
    save_checkpoint(paths.checkpoint, tr.opt, state, job.task, cfg, env, stopped if stopped != "completed" else None)
    barrier(env)
    return stopped in ("max_steps", "max_minutes")


def check_ranks_agree(model: nn.Module, out: Path, env: DistEnv) -> None:
    """Ranks must agree on the weights they trained; check it rather than assume it."""
    checksums = all_gather_object(state_checksum(model), env)
    if env.is_main and env.distributed:
        (out / "ddp_check.json").write_text(
            json.dumps({"world_size": env.world_size, "checksums": checksums, "agree": len(set(checksums)) == 1}, indent=1)
        )
    if len(set(checksums)) != 1:
        raise BonescreenError(f"DDP ranks ended with different weights: {checksums}", reason="ddp_mismatch")


def finish_run(job: TrainJob, model: nn.Module, state: LoopState, paths: RunPaths, cfg: TrainConfig, env: DistEnv,
               progress: bool) -> TrainResult:
    """The final model (the best epoch; the last one if nothing was evaluated), its card and test predictions."""
    barrier(env)
    best = state.best
    if best is not None and paths.artifact.is_file():
        payload = torch.load(paths.artifact, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state_dict"])
    card = dict(job.model_card)
    card["tune_metrics"] = best["metrics"] if best else {}
    # the reference for score drift after deployment (`bonescreen monitor`, PSI)
    card["tune_score_histogram"] = best.get("tune_score_histogram") if best else None
    card["best_epoch"] = best["epoch"] if best else None
    card["epochs_run"] = len([h for h in state.history if not h["partial"]])
    card["global_step"] = state.global_step
    card["stopped"] = state.stopped
    card["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    predictions_path = None
    test_metrics, preds = job.evaluation.test(model, env, cfg, progress, job.model_name)
    if test_metrics is not None:
        card["test_metrics"] = test_metrics
    if preds is not None:
        predictions_path = paths.out / "predictions.csv"
        write_frame(preds, predictions_path)
    if env.is_main:
        save_artifact(paths.artifact, model, spec_with_card(job.spec, plain(card)))
        (paths.out / "model_card.json").write_text(json.dumps(plain(card), indent=1, default=str))
    barrier(env)
    return TrainResult(
        out_dir=paths.out, artifact_path=paths.artifact, checkpoint_path=paths.checkpoint,
        metrics_csv=paths.metrics_csv, predictions_path=predictions_path,
        best_epoch=best["epoch"] if best else None, best_metrics=best["metrics"] if best else {},
        history=state.history, global_step=state.global_step, stopped=state.stopped,
        n_skipped_images=job.n_skipped_images, model_card=plain(card),
    )
