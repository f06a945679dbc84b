"""A pediatric model as the mean of K cross-fitted fusion models (``bonescreen pediatric train --folds K``).

Why: a pediatric cohort is small (the study: 774 development pairs; the phantom
bench: 210 training children), and two things then rest on too little data.
(1) One network's ranking varies with its seed and its tuning-selected epoch
(the phantom bench: external-site headroom 0.62-0.89 over three seeds of one
recipe); the mean of K members varies less and correlates better. (2) The spread
calibration (:func:`bonescreen.pediatric.model.fit_spread`) is a ratio of two SDs,
about +-25 % on a 30-child tuning split. Cross-fitting answers both: the training
children are split into K folds (a child's images stay together), member k trains
on the other folds for the whole schedule (its last epoch is kept: with the spread
fitted out of fold, a 30-child tuning split would only pick the epoch, and that
pick is mostly noise; :class:`bonescreen.training.selection.LastEpochSelection`),
and predicts fold k. Every training pair then has an out-of-fold prediction, so the Z
source, the stretch and the residual SD are fitted on all of them, and the artifact
is the members' mean (:class:`bonescreen.pediatric.model.FusionEnsemble`), with one
standardisation and one BMD reference curve (the full training split's) for all.
Costs K trainings of (K-1)/K of the data, and K forward passes per screened image.

``refit=N`` (``--refit N``) keeps the out-of-fold fits but screens with N members
trained on the *whole* training split instead (seeds ``seed .. seed+N-1``): the
folds then only measure (Z source, stretch, residual SD), as in stacking, and the
model loses no data to them. Why: at a few hundred children one fifth less data
costs ranking (the phantom bench, external site, three seeds: headroom 0.84 with
``--refit 3`` against 0.81 for the five fold members; README "Domain-robust training").
Costs K + N trainings and N forward passes per screened image.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen.artifact import load_artifact
from bonescreen.config import ConfigError, TrainConfig, load_config
from bonescreen.data import read_manifest
from bonescreen.distributed import cleanup, init_distributed
from bonescreen.errors import TableError
from bonescreen.pediatric.data import clinical_of, targets_of
from bonescreen.pediatric.model import FusionEnsemble, FusionRegressor, Standardizer
from bonescreen.training.hooks import TrainResult
from bonescreen.training.pediatric import (
    Z_FROM_CHOICES,
    OutOfFold,
    PediatricHooks,
    PediatricTrainResult,
    SharedFit,
    candidate_z,
    fit_reference,
    pediatric_card,
    pediatric_spec,
    pediatric_splits,
    train_pediatric,
    z_modes,
)
from bonescreen.training.model import resolve_pretrained

log = logging.getLogger(__name__)

MIN_CHILDREN_PER_FOLD = 5


def assign_folds(patients: pd.Series, folds: int, seed: int) -> np.ndarray:
    """Fold index per row, by child: a seeded permutation of the distinct patient IDs dealt round-robin."""
    ids = np.array(sorted(patients.astype(str).unique()))
    order = np.random.default_rng(seed).permutation(len(ids))
    fold = {pid: i % folds for i, pid in enumerate(ids[order])}
    out: np.ndarray = patients.astype(str).map(fold).to_numpy(int)
    return out


def member_rows(rows: pd.DataFrame, fold: np.ndarray, k: int) -> pd.DataFrame:
    """Member k's manifest: the other folds train, fold k is its 'test' (its out-of-fold rows), tune unchanged."""
    dev = rows[rows["split"].astype(str).isin(["train", "tune"])].copy()
    is_train = (dev["split"].astype(str) == "train").to_numpy()
    split = dev["split"].astype(str).to_numpy().copy()
    split[is_train] = np.where(fold == k, "test", "train")
    dev["split"] = split
    return dev


def train_pediatric_ensemble(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_root: str | Path,
    folds: int = 5,
    model_name: str = "pediatric",
    bmd_weight: float = 0.5,
    z_from: str = "auto",
    z_spread: str = "match",
    refit: int = 0,
) -> PediatricTrainResult:
    """K cross-fitted members -> one artifact (their mean, or the mean of ``refit`` full-data members);
    Z source, spread and residual SD out of fold.

    Writes what ``train_pediatric`` writes (model.pt, predictions.csv, tune_predictions.csv,
    regression.json, model_card.json) plus ``members/fold<k>/`` (each member's metrics.csv and
    its out-of-fold predictions), ``members/full<i>/`` with ``refit`` and ``oof_predictions.csv``.
    """
    if folds < 2:
        raise ConfigError(f"--folds needs at least 2 folds, got {folds}")
    if refit < 0:
        raise ConfigError(f"--refit needs 0 (screen with the fold members) or more full-data members, got {refit}")
    if z_from not in Z_FROM_CHOICES:
        raise ValueError(f"z_from must be one of {Z_FROM_CHOICES}, got {z_from!r}")
    cfg = (config or load_config("pediatric-cpu-tiny")).validate()
    env = init_distributed(cfg.device)
    try:
        if env.world_size > 1:
            raise ConfigError("--folds trains its members one after another in one process; run it without "
                              "torchrun (or train one model with torchrun)")
        out = Path(out_dir)
        rows = read_manifest(manifest)
        preps, dropped = pediatric_splits(rows, cache_root, cfg, env)
        train_f = preps["train"].frame
        n_children = train_f["patient_id"].astype(str).nunique()
        if n_children < folds * MIN_CHILDREN_PER_FOLD:
            raise TableError(f"--folds {folds} needs at least {folds * MIN_CHILDREN_PER_FOLD} training children "
                             f"({MIN_CHILDREN_PER_FOLD} per fold); the train split has {n_children}",
                             reason="no_data")
        shared = SharedFit(Standardizer.fit(clinical_of(train_f), targets_of(train_f)),
                           fit_reference(train_f, z_from, cfg.seed))
        members = train_members(rows, train_f, out, cfg, cache_root, folds, bmd_weight, z_from, model_name, shared)
        full = train_refit(rows, out, cfg, cache_root, refit, bmd_weight, z_from, model_name, shared)
        return assemble(members, full, preps, dropped, shared, out, cfg, env, folds=folds, z_from=z_from,
                        z_spread=z_spread, bmd_weight=bmd_weight, model_name=model_name)
    finally:
        cleanup(env)


def train_members(rows: pd.DataFrame, train_f: pd.DataFrame, out: Path, cfg: TrainConfig, cache_root: str | Path,
                  folds: int, bmd_weight: float, z_from: str, model_name: str,
                  shared: SharedFit) -> list[tuple[FusionRegressor, np.ndarray, int | None]]:
    """Train member k on the other folds; (network, the train-split rows it never saw, its best epoch) per member."""
    train_rows = rows[rows["split"].astype(str) == "train"]
    fold = assign_folds(train_rows["patient_id"], folds, cfg.seed)
    fold_of_image = dict(zip(train_rows["image_id"].astype(str), fold))
    held = train_f["image_id"].astype(str).map(fold_of_image).to_numpy()
    members = []
    for k in range(folds):
        log.info("member %d/%d: %d training images, %d held out", k + 1, folds, int((fold != k).sum()),
                 int((fold == k).sum()))
        net, epoch = train_member(member_rows(rows, fold, k), out / "members" / f"fold{k}", cfg, cache_root,
                                  bmd_weight, z_from, f"{model_name}-fold{k}", shared)
        members.append((net, np.flatnonzero(held == k), epoch))
    return members


def train_refit(rows: pd.DataFrame, out: Path, cfg: TrainConfig, cache_root: str | Path, n: int,
                bmd_weight: float, z_from: str, model_name: str,
                shared: SharedFit) -> list[tuple[FusionRegressor, int | None]]:
    """N members on the whole training split, seeds ``cfg.seed + i``: (network, best epoch) per member."""
    full = []
    for i in range(n):
        log.info("full-data member %d/%d (seed %d)", i + 1, n, cfg.seed + i)
        full.append(train_member(rows, out / "members" / f"full{i}", replace(cfg, seed=cfg.seed + i), cache_root,
                                 bmd_weight, z_from, f"{model_name}-full{i}", shared))
    return full


def train_member(rows: pd.DataFrame, mdir: Path, cfg: TrainConfig, cache_root: str | Path, bmd_weight: float,
                 z_from: str, name: str, shared: SharedFit) -> tuple[FusionRegressor, int | None]:
    """One member run (no stretch, the ensemble's standardisation); its folder keeps metrics and predictions."""
    res = train_pediatric(rows, mdir, cfg, cache_root=cache_root, bmd_weight=bmd_weight, z_from=z_from,
                          z_spread="none", model_name=name, shared=shared)
    net = load_artifact(res.artifact_path).model
    assert isinstance(net, FusionRegressor)  # a member run always writes one fusion model
    for heavy in ("model.pt", "checkpoint.pt"):  # the ensemble's artifact holds the weights
        (mdir / heavy).unlink(missing_ok=True)
    shutil.rmtree(mdir / "tensorboard", ignore_errors=True)
    return net, res.best_epoch


def out_of_fold(hooks: PediatricHooks, members: list[tuple[FusionRegressor, np.ndarray, int | None]],
                screening: list[FusionRegressor], refit: int = 0) -> tuple[OutOfFold, pd.DataFrame]:
    """Every training pair scored by the member that did not train on it; how much the mean of the
    ``screening`` members narrows one member's spread, per source (1 for a single network)."""
    train_f = hooks.preps["train"].frame
    clin = clinical_of(train_f)
    parts: dict[str, np.ndarray] = {}
    for net, idx, _ in members:
        z_head, bmd = hooks.outputs(net, "train", "cpu", idx)
        for name, z in candidate_z(z_head, bmd, clin[idx], hooks.extra, hooks.reference).items():
            parts.setdefault(name, np.full(len(train_f), np.nan))[idx] = z
    averaging: dict[str, float] = {}
    if len(hooks.tune_frame) >= 2 and len(screening) >= 2:  # SD(member) / SD(ensemble) on the tuning images
        tune_clin = clinical_of(hooks.tune_frame)
        outputs = [hooks.outputs(net, "tune", "cpu") for net in screening]
        # the ensemble's (Z head, BMD) is the members' mean (FusionEnsemble averages, the un-standardising is affine)
        ens_head, ens_bmd = (np.mean([o[i] for o in outputs], axis=0) for i in (0, 1))
        ens = candidate_z(ens_head, ens_bmd, tune_clin, hooks.extra, hooks.reference)
        each = [candidate_z(z_head, bmd, tune_clin, hooks.extra, hooks.reference) for z_head, bmd in outputs]
        for name, z in ens.items():
            sd_ens = float(np.std(z, ddof=1))
            if sd_ens > 1e-9:
                averaging[name] = float(np.mean([np.std(e[name], ddof=1) for e in each])) / sd_ens
    oof = OutOfFold(train_f["_z"].to_numpy(float), parts, averaging, len(members), refit)
    table = pd.DataFrame({"image_id": train_f["image_id"].astype(str).to_numpy(),
                          "patient_id": train_f["patient_id"].astype(str).to_numpy(), "z_true": oof.z_true,
                          **{f"z_pred_{k}": np.round(v, 4) for k, v in parts.items()}})
    return oof, table


def assemble(members: list[tuple[FusionRegressor, np.ndarray, int | None]],
             full: list[tuple[FusionRegressor, int | None]], preps: dict[str, Any],
             dropped: dict[str, int], shared: SharedFit, out: Path, cfg: TrainConfig, env: Any, *, folds: int,
             z_from: str, z_spread: str, bmd_weight: float, model_name: str) -> PediatricTrainResult:
    """The screening members' mean (the fold members, or the full-data ones) as one artifact, with the Z
    source, stretch and residual SD fitted on the fold members' out-of-fold predictions."""
    reference = shared.reference
    modes = z_modes(z_from, reference)
    spec = pediatric_spec(cfg, shared.standardizer, reference, modes)
    n_children = preps["train"].frame["patient_id"].nunique()
    screening = [net for net, _ in full] if full else [net for net, _, _ in members]
    how = (f"{len(full)} trained on all {n_children} training children (seeds {cfg.seed}..{cfg.seed + len(full) - 1}); "
           f"Z source and spread from {folds} cross-fitted members" if full else
           f"cross-fitted: member k trained without fold k of the {n_children} training children")
    model: FusionRegressor | FusionEnsemble = screening[0]
    if len(screening) > 1:
        spec.extra["ensemble"] = {"members": len(screening), "how": how}
        model = FusionEnsemble(screening)
    model.eval()
    hooks = PediatricHooks(preps, spec, shared.standardizer, reference, modes, z_from, z_spread, bmd_weight,
                           model_name, dropped, cfg.eval_batch_size or 2 * cfg.batch_size)
    hooks.oof, oof_table = out_of_fold(hooks, members, screening, refit=len(full))
    out.mkdir(parents=True, exist_ok=True)
    oof_table.to_csv(out / "oof_predictions.csv", index=False)
    _, desc = resolve_pretrained(cfg)
    card = pediatric_card(cfg, model_name, desc, preps, dropped, bmd_weight)
    card["ensemble"] = {"members": len(screening), "how": how, "folds": folds,
                        "fold_best_epochs": [e for _, _, e in members], "averaging": hooks.oof.averaging}
    if full:
        card["ensemble"]["full_best_epochs"] = [e for _, e in full]
    metrics = out / "members" / "metrics.csv"
    frames = [pd.read_csv(p).assign(member=p.parent.name) for p in sorted((out / "members").glob("*/metrics.csv"))]
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(metrics, index=False)
    result = TrainResult(out, out / "model.pt", out / "members", metrics, None, None, {}, [], 0, "members",
                         model_card=card)
    res = hooks.save(model, result, preps, cfg, env, out)
    log.info("pediatric model of %d members (%s): %s", len(screening), how, json.dumps(card["ensemble"], default=str))
    return replace(res, best_epoch=None)
