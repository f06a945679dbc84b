"""Checkpoints and resume: the loop's position, optimiser/scheduler/scaler state and every RNG.

A resumed run continues with the same random draws as an uninterrupted one
(rank 0 restores the torch, CUDA, numpy and Python generators; the data order
comes from the epoch-seeded sampler and loader generator).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bonescreen import __version__
from bonescreen.fsio import atomic_torch_save
from bonescreen.config import FIELDS, ConfigError, TrainConfig
from bonescreen.distributed import DistEnv

log = logging.getLogger(__name__)

# settings that change the data order or the network: a resumed run must keep them
RESUME_KEYS = (
    "arch", "image_size", "batch_size", "seed", "augment", "student_augment", "balance",
    "site_shift", "site_shift_strength", "site_shift_polarity",
)


@dataclass
class LoopState:
    """Where a run stands: what a checkpoint saves and ``--resume`` restores."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    bad_epochs: int = 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    early_stopped: bool = False
    stopped: str = "completed"


@dataclass
class Optimisation:
    """The objects whose state a checkpoint holds besides the weights."""

    model: torch.nn.Module  # the unwrapped model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def rng_state() -> dict[str, Any]:
    np_state = cast(tuple[Any, ...], np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
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


def save_checkpoint(path: Path, opt: Optimisation, state: LoopState, task: str, cfg: TrainConfig, env: DistEnv,
                    stopped: str | None = None) -> None:
    """Write the checkpoint (rank 0; atomic). ``stopped``: why the run stopped, ``None`` while it runs."""
    if not env.is_main:
        return
    atomic_torch_save(
        {
            "format": "bonescreen-checkpoint",
            "bonescreen_version": __version__,
            "task": task,
            "model": {k: v.detach().cpu() for k, v in opt.model.state_dict().items()},
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "best": state.best,
            "bad_epochs": state.bad_epochs,
            "history": state.history,
            "early_stopped": state.early_stopped,
            "stopped": stopped,
            "world_size": env.world_size,
            "rng": rng_state(),
            "config": cfg.to_dict(),
        },
        path,
    )


def start_state(path: Path, opt: Optimisation, cfg: TrainConfig, env: DistEnv, *, resume: bool) -> LoopState:
    """A fresh run (seeded per rank), or the checkpoint's state restored into ``opt`` (``resume``)."""
    if not resume:
        torch.manual_seed(cfg.seed + 1000 * env.rank)
        if env.is_main and path.exists():
            log.warning("%s exists and will be overwritten (use --resume to continue it)", path)
        return LoopState()
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    saved = ck["config"]
    # a key missing from an older checkpoint had its default then
    changed = [k for k in RESUME_KEYS if saved.get(k, FIELDS[k].default) != getattr(cfg, k)]
    if changed:
        raise ConfigError(
            f"cannot resume {path}: {', '.join(changed)} differ from the saved run "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})"
        )
    if ck.get("world_size", 1) != env.world_size:
        raise ConfigError(
            f"cannot resume {path}: saved with {ck.get('world_size', 1)} processes, "
            f"now {env.world_size} (the per-process data order would change)"
        )
    opt.model.load_state_dict(ck["model"])
    opt.optimizer.load_state_dict(ck["optimizer"])
    opt.scheduler.load_state_dict(ck["scheduler"])
    opt.scaler.load_state_dict(ck["scaler"])
    state = LoopState(
        epoch=ck["epoch"], step_in_epoch=ck["step_in_epoch"], global_step=ck["global_step"],
        bad_epochs=ck["bad_epochs"], best=ck["best"], history=list(ck["history"]),
        early_stopped=bool(ck.get("early_stopped", False)),
    )
    if env.is_main:
        set_rng_state(ck["rng"])
    else:
        torch.manual_seed(cfg.seed + 1000 * env.rank + state.global_step)
    log.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.global_step)
    return state
