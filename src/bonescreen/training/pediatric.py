"""Train the pediatric fusion model: the pediatric task's hooks on the shared loop (``training.loop.fit``).

``train_pediatric`` writes into ``out_dir``:

    model.pt              the artifact (task "pediatric", fusion model, spec.extra)
    checkpoint.pt, metrics.csv, tensorboard/   from ``fit`` (resumable, DDP-ready)
    tune_predictions.csv  the tuning split (evaluate's --tune: thresholds)
    predictions.csv       the test split, in evaluate's predictions format plus
                          z_true, z_pred, bmd_true, bmd_pred
    regression.json       Pearson r, ICC, MAE on the test split
    model_card.json

Model selection: the classifier's tuning evaluation is an image-only
classification forward, which a fusion model does not have, so
:class:`PediatricHooks` gives ``fit`` its own evaluation (a
:class:`bonescreen.training.selection.CallbackEvaluation`): after every epoch it
predicts the tuning split and scores it by the **mean absolute error of the
predicted Z** (lower is better; MAE rather than Pearson r because the decision
Z <= -2.0 needs a calibrated Z, and r ignores bias and scale). The best epoch
and early stopping follow it. Without a tuning split the epoch with the lowest
training loss is kept (a warning says so).

Where the reported Z comes from (``z_from``): the network's Z head, the
predicted BMD converted through the age- and sex-matched reference curve
fitted on the training DXA table (:mod:`bonescreen.pediatric.reference`), or
their mean. ``auto`` (default) takes the one with the lowest tuning MAE at the
best epoch (the per-epoch score is then the lowest MAE of the three).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from bonescreen import __version__
from bonescreen.artifact import ModelSpec, save_artifact
from bonescreen.config import ConfigError, TrainConfig, load_config
from bonescreen.data import PreparedImages, read_manifest, split_rows
from bonescreen.distributed import DistEnv, all_gather_object, cleanup, init_distributed
from bonescreen.errors import TableError
from bonescreen.jsonable import plain
from bonescreen.labels import PEDIATRIC_LOW_Z
from bonescreen.models import GRAY_MEAN, GRAY_STD
from bonescreen.pediatric.data import PediatricDataset, clinical_of, pediatric_rows, targets_of
from bonescreen.pediatric.metrics import regression_metrics
from bonescreen.pediatric.model import (
    CLINICAL_FEATURES,
    DEFAULT_HIDDEN,
    PEDIATRIC_ELIGIBILITY,
    TARGETS,
    Z_SPREADS,
    SPREAD_TOLERANCE,
    FusionRegressor,
    Standardizer,
    combine_z,
    fit_spread,
    low_bmd_probability,
    predict_outputs,
    spread_z,
)
from bonescreen.pediatric.reference import ReferenceCurves, ReferenceFitError
from bonescreen.schema import PEDIATRIC_TASK
from bonescreen.site_shift import from_config as site_shift_from_config
from bonescreen.tasks import get_task
from bonescreen.training.checkpoint import seed_everything
from bonescreen.training.hooks import Evaluation, LossFn, TrainResult
from bonescreen.training.jobs import train_task
from bonescreen.training.model import resolve_pretrained
from bonescreen.training.outputs import write_frame
from bonescreen.training.prepare import prepare_split
from bonescreen.training.selection import CallbackEvaluation, LastEpochSelection, TrainLossSelection

log = logging.getLogger(__name__)

PREDICTION_ORDER = [
    "image_id", "patient_id", "site", "sex", "age", "height_cm", "weight_kg",
    "score", "label", "z_true", "z_pred", "z_pred_head", "z_pred_ref", "bmd_true", "bmd_pred", "model", "split",
]
Z_FROM_CHOICES = ("auto", "head", "reference", "mean")


@dataclass
class PediatricTrainResult:
    out_dir: Path
    artifact_path: Path
    predictions_path: Path | None
    tune_predictions_path: Path | None
    regression: dict[str, Any]
    residual_sd_z: float
    history: list[dict[str, Any]]
    dropped_rows: dict[str, int]
    z_from: str = "head"
    best_epoch: int | None = None
    z_from_selection: dict[str, dict[str, float]] | None = None


def z_agreement(z_true: np.ndarray, z_pred: np.ndarray) -> dict[str, float]:
    """MAE and Pearson r of a predicted Z (the model-selection numbers), and ``mae_spread``.

    ``mae_spread``: the MAE after the spread calibration fitted on these same pairs
    (:func:`bonescreen.pediatric.model.fit_spread`; the raw MAE when none can be
    fitted). Selecting on the raw MAE rewards predictions shrunk toward the mean
    (a shrunk Z has a lower MAE); once the reported Z is stretched back, the
    epoch and source to keep are those with the lowest MAE *after* the stretch.
    """
    t, p = np.asarray(z_true, dtype=float), np.asarray(z_pred, dtype=float)
    ok = np.isfinite(t) & np.isfinite(p)
    if ok.sum() < 2:
        return {"mae": float("nan"), "r": float("nan"), "mae_spread": float("nan")}
    t, p = t[ok], p[ok]
    r = float(np.corrcoef(t, p)[0, 1]) if np.std(t) > 0 and np.std(p) > 0 else float("nan")
    sp = fit_spread(t, p)
    stretched = spread_z(p, {"z_spread": sp}) if sp else p
    return {"mae": float(np.mean(np.abs(t - p))), "r": r, "mae_spread": float(np.mean(np.abs(t - stretched)))}


def candidate_z(z_head: np.ndarray, bmd: np.ndarray, clinical_raw: np.ndarray, extra: dict[str, Any],
                reference: Any) -> dict[str, np.ndarray]:
    """Every available predicted Z: the head's, and with a reference curve the converted BMD and the mean."""
    out = {"head": np.asarray(z_head, dtype=float)}
    if reference is not None:
        out["reference"] = combine_z(z_head, bmd, clinical_raw, extra, "reference", reference=reference)
        out["mean"] = 0.5 * (out["head"] + out["reference"])
    return out


def predictions_table(
    frame: pd.DataFrame, z_pred: np.ndarray, bmd_pred: np.ndarray, residual_sd: float, *, model_name: str, split: str,
    z_parts: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """evaluate's predictions format: ``score`` = P(low BMD) from the predicted Z, ``label`` = DXA Z <= -2.

    ``z_parts`` (optional) adds the Z head's and the reference conversion's
    predictions (``z_pred_head``, ``z_pred_ref``) beside the reported ``z_pred``.
    """
    out = pd.DataFrame({"image_id": frame["image_id"].astype(str).to_numpy()})
    for col in ("patient_id", "site", "sex", "age", "height_cm", "weight_kg"):
        if col in frame.columns:
            out[col] = frame[col].to_numpy()
    out["score"] = low_bmd_probability(z_pred, residual_sd)
    out["label"] = frame["_y"].astype(int).to_numpy()
    out["z_true"] = frame["_z"].to_numpy()
    out["z_pred"] = np.round(z_pred, 4)
    for key, col in (("head", "z_pred_head"), ("reference", "z_pred_ref")):
        if z_parts is not None and key in z_parts:
            out[col] = np.round(z_parts[key], 4)
    out["bmd_true"] = frame["_bmd"].to_numpy()
    out["bmd_pred"] = np.round(bmd_pred, 4)
    out["model"] = model_name
    out["split"] = split
    return out[[c for c in PREDICTION_ORDER if c in out.columns]]



def pediatric_splits(manifest: str | Path | pd.DataFrame, cache_root: str | Path, cfg: TrainConfig,
                     env: DistEnv) -> tuple[dict[str, PreparedImages], dict[str, int]]:
    """The usable pediatric rows of each split, prepared; and the rows dropped per reason."""
    frame, dropped = pediatric_rows(read_manifest(manifest))
    splits = {s: split_rows(frame, s) for s in ("train", "tune", "test")}
    if len(splits["train"]) < 2:
        raise TableError("the manifest has fewer than 2 usable pediatric 'train' rows", reason="no_data")
    preps = {s: prepare_split(f, cache_root, cfg.image_size, cfg, env, cfg.progress and env.is_main)
             for s, f in splits.items()}
    if preps["train"].frame.empty:
        raise TableError("no training image could be read", reason="no_data")
    return preps, dropped


def z_modes(z_from: str, reference: ReferenceCurves | None) -> list[str]:
    """The Z sources a run may choose among: all three for ``auto`` with a reference curve, else one."""
    if z_from != "auto":
        return [z_from]
    return ["head", "reference", "mean"] if reference is not None else ["head"]


def fit_reference(train_f: pd.DataFrame, z_from: str, seed: int) -> ReferenceCurves | None:
    """The scanner's reference, recovered from the training (BMD, Z) pairs (``None`` when it cannot be fitted)."""
    try:
        return ReferenceCurves.fit(train_f["_clin_age"], train_f["_clin_sex"], train_f["_z"], train_f["_bmd"],
                                   seed=seed)
    except ReferenceFitError as exc:
        if z_from in ("reference", "mean"):
            raise TableError(f"z_from={z_from!r} needs a BMD reference curve: {exc}", reason="no_data") from exc
        log.warning("no BMD reference curve (%s): the predicted Z comes from the Z head", exc)
        return None


def pediatric_spec(cfg: TrainConfig, st: Standardizer, reference: ReferenceCurves | None,
                   modes: list[str]) -> ModelSpec:
    """The artifact's spec; ``spec.extra`` (the fusion model's settings) is completed after training."""
    extra: dict[str, Any] = {
        "kind": "fusion_regressor",
        "clinical_features": list(CLINICAL_FEATURES),
        "sex_coding": {"F": 1.0, "M": 0.0},
        "targets": list(TARGETS),
        "target_columns": {"z": "z_lumbar_spine", "bmd": "bmd_lumbar_spine"},
        "hidden": DEFAULT_HIDDEN,
        "z_threshold": PEDIATRIC_LOW_Z,
        "residual_sd_z": 1.0,
        "z_from": modes[0] if len(modes) == 1 else "head",  # auto: resolved after training
        **st.to_extra(),
    }
    if reference is not None:
        extra["z_reference"] = reference.to_dict()
    return ModelSpec.for_task(
        cfg.arch,
        PEDIATRIC_TASK,
        preprocess={"method": "truncation", "size": int(cfg.image_size), "mean": GRAY_MEAN, "std": GRAY_STD},
        threshold=0.5,
        eligibility=dict(PEDIATRIC_ELIGIBILITY),
        extra=extra,
    )


def pediatric_card(cfg: TrainConfig, model_name: str, pretrained_desc: str, preps: dict[str, PreparedImages],
                   dropped: dict[str, int], bmd_weight: float) -> dict[str, Any]:
    return {
        "kind": "pediatric_fusion",
        "model_name": model_name,
        "preset": cfg.preset,
        "arch": cfg.arch,
        "pretrained": pretrained_desc,
        "image_size": cfg.image_size,
        "decision": "low BMD when the predicted Z-score <= -2.0 (score = P(Z <= -2) >= 0.5)",
        "training_data": {
            s: {"n": len(p.frame), "n_low_bmd": int(p.frame["_y"].sum()) if len(p.frame) else 0}
            for s, p in preps.items()
        },
        "dropped_rows": dropped,
        "loss": {"z": 1.0, "bmd": float(bmd_weight)},
        "config": cfg.to_dict(),
        "bonescreen_version": __version__,
    }


@dataclass
class SharedFit:
    """What every member of an ensemble shares: the clinical/target standardisation and the BMD reference."""

    standardizer: Standardizer
    reference: ReferenceCurves | None


@dataclass
class OutOfFold:
    """Every training pair predicted by the ensemble member that did not train on it (``training.crossfit``).

    ``parts``: the candidate Zs per source (head, reference, mean) of the members;
    ``averaging``: SD(a member's Z) / SD(the ensemble's Z) on the tuning images (no labels
    needed), how much the ensemble's mean narrows a member's spread, so a stretch fitted on
    member predictions is carried over to the ensemble's.
    """

    z_true: np.ndarray
    parts: dict[str, np.ndarray]
    averaging: dict[str, float]
    folds: int
    refit: int = 0  # >0: the artifact is that many members trained on the whole split, not the fold members

    @property
    def described(self) -> str:
        screened = f", carried over to {self.refit} full-data member(s)" if self.refit else ""
        return f"out-of-fold predictions of the training split ({self.folds} folds{screened})"

    def scaled(self, source: str) -> np.ndarray:
        """A member's out-of-fold Z, narrowed as the ensemble's mean narrows it (about its mean)."""
        p = np.asarray(self.parts[source], dtype=float)
        narrowed: np.ndarray = p.mean() + (p - p.mean()) / float(self.averaging.get(source, 1.0))
        return narrowed


Scored = tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]  # a split's rows, its candidate Zs, predicted BMD


@dataclass
class PediatricHooks:
    """The pediatric task on the shared loop: fusion dataset, Z(+BMD) regression loss, tuning Z MAE
    per epoch; after training, the Z source and spread calibration, predictions, regression metrics."""

    preps: dict[str, PreparedImages]
    spec: ModelSpec  # spec.extra is the same dict as ``extra`` (completed in ``save``)
    standardizer: Standardizer
    reference: ReferenceCurves | None
    modes: list[str]
    z_from: str
    z_spread: str
    bmd_weight: float
    model_name: str
    dropped: dict[str, int]
    eval_batch_size: int
    # an ensemble member's run (training.crossfit): no OOD part, and its last epoch is kept
    # (training.selection.LastEpochSelection) instead of the best tuning MAE
    member: bool = False
    # out-of-fold predictions of the training split (an ensemble, training.crossfit): the Z source,
    # spread and residual SD are fitted on these instead of the small tuning split
    oof: OutOfFold | None = None
    task: str = PEDIATRIC_TASK
    extra: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.extra = self.spec.extra

    @property
    def sel_key(self) -> str:
        """What selection minimises: the MAE after the spread calibration when it is applied."""
        return "mae_spread" if self.z_spread == "match" else "mae"

    @property
    def tune_frame(self) -> pd.DataFrame:
        return self.preps["tune"].frame

    def train_dataset(self, prep: PreparedImages, cfg: TrainConfig) -> PediatricDataset:
        f = prep.frame
        return get_task(self.task).dataset(  # type: ignore[no-any-return]
            prep.source, f["_y"].to_numpy(), clinical_raw=clinical_of(f), targets_raw=targets_of(f),
            standardizer=self.standardizer, augment=cfg.augment, strong_p=cfg.strong_p, seed=cfg.seed,
            site_shift=site_shift_from_config(cfg),
        )

    def loss(self, cfg: TrainConfig) -> LossFn:
        return get_task(self.task).loss(bmd_weight=self.bmd_weight)

    def evaluation(self, preps: dict[str, PreparedImages], cfg: TrainConfig) -> Evaluation:
        if self.member:  # the tuning Z MAE is logged, the last epoch kept
            return LastEpochSelection(CallbackEvaluation(self.evaluate_tune) if len(self.tune_frame) >= 2 else None)
        if len(self.tune_frame) < 2:
            log.warning("fewer than 2 tuning images: the epoch with the lowest training loss is kept")
            return TrainLossSelection()
        return CallbackEvaluation(self.evaluate_tune)

    def outputs(self, model: Any, name: str, device: Any, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """(Z head, BMD head) for ``rows`` of a split, read from the cache in chunks."""
        p = self.preps[name]
        idx = np.arange(len(p.frame)) if rows is None else rows
        zs, bs = [np.zeros(0)], [np.zeros(0)]
        for start in range(0, len(idx), 256):
            part = idx[start : start + 256]
            z, b = predict_outputs(model, p.source.batch(part.tolist()), clinical_of(p.frame)[part], self.extra,
                                   mean=GRAY_MEAN, std=GRAY_STD, batch_size=self.eval_batch_size, device=device)
            zs.append(z)
            bs.append(b)
        return np.concatenate(zs), np.concatenate(bs)

    def evaluate_tune(self, model: nn.Module, env: DistEnv) -> tuple[dict[str, float], float]:
        """Tuning Z MAE (+ r) per candidate source; score = -(the lowest MAE among the allowed sources)."""
        tune_f = self.tune_frame
        mine = np.arange(env.rank, len(tune_f), env.world_size)
        z_head, bmd = self.outputs(model, "tune", env.device, mine)
        parts = all_gather_object((mine, z_head, bmd), env)
        zh, bm = np.zeros(len(tune_f)), np.zeros(len(tune_f))
        for ids, a, b in parts:
            zh[ids], bm[ids] = a, b
        cands = candidate_z(zh, bm, clinical_of(tune_f), self.extra, self.reference)
        metrics: dict[str, float] = {}
        for name, zp in cands.items():
            for k, v in z_agreement(tune_f["_z"].to_numpy(float), zp).items():
                metrics[f"tune_{k}_z_{name}"] = v
        if tune_f["_bmd"].notna().any():
            metrics["tune_mae_bmd"] = float(np.nanmean(np.abs(tune_f["_bmd"].to_numpy(float) - bm)))
        maes = [metrics[f"tune_{self.sel_key}_z_{m}"] for m in self.modes
                if np.isfinite(metrics.get(f"tune_{self.sel_key}_z_{m}", np.nan))]
        return metrics, (-min(maes) if maes else float("nan"))

    def score(self, model: nn.Module, name: str) -> Scored:
        f = self.preps[name].frame
        z_head, bmd = self.outputs(model, name, "cpu")
        return f, candidate_z(z_head, bmd, clinical_of(f), self.extra, self.reference), bmd

    def choose_z_from(self, tune_scored: Scored | None) -> tuple[str, dict[str, dict[str, float]] | None]:
        """``z_from=auto``: the source with the lowest tuning MAE (into ``extra``; an ensemble: out-of-fold
        MAE); the per-source agreement."""
        extra, sel_key = self.extra, self.sel_key
        selection: dict[str, dict[str, float]] | None = None
        if self.oof is not None:
            selection = {m: z_agreement(self.oof.z_true, self.oof.scaled(m)) for m in self.oof.parts}
        elif tune_scored is not None:
            f, cands, _ = tune_scored
            selection = {m: z_agreement(f["_z"].to_numpy(float), cands[m]) for m in cands}
        if selection is not None:
            if self.z_from == "auto":
                finite = [m for m in self.modes if np.isfinite(selection[m]["mae"])]
                extra["z_from"] = min(finite, key=lambda m: selection[m][sel_key]) if finite else "head"
        elif self.z_from == "auto":
            extra["z_from"] = "reference" if self.reference is not None else "head"
            log.warning("no tuning split: z_from=auto falls back to %r without a measurement", extra["z_from"])
        chosen = str(extra["z_from"])
        log.info("predicted Z from: %s%s", chosen,
                 "" if selection is None else f" (tuning {sel_key.replace('_', ' ')} " + ", ".join(
                     f"{m} {v[sel_key]:.3f}" for m, v in selection.items()) + ")")
        return chosen, selection

    def spread_pairs(self, tune_scored: Scored | None, chosen: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(DXA Z, predicted Z, what they are) the spread calibration and residual SD are fitted on."""
        if self.oof is not None:
            return self.oof.z_true, self.oof.scaled(chosen), self.oof.described
        assert tune_scored is not None  # write_tune returns early without either
        f, cands, _ = tune_scored
        return f["_z"].to_numpy(float), cands[chosen], "the tuning split"

    def write_tune(self, tune_scored: Scored | None, chosen: str, out: Path) -> Path | None:
        """The spread calibration and residual SD (into ``extra``; tuning split or out-of-fold pairs);
        tune_predictions.csv."""
        extra = self.extra
        extra.pop("z_spread", None)
        if tune_scored is None and self.oof is None:
            (log.info if self.member else log.warning)(
                "no tuning split: the low-BMD score uses a residual SD of 1.0 and no spread calibration")
            return None
        z_true, z_pred, fitted_on = self.spread_pairs(tune_scored, chosen)
        spread = fit_spread(z_true, z_pred, n_boot=400) if self.z_spread != "none" else None
        if spread is not None:
            extra["z_spread"] = {**spread, "fitted_on": fitted_on}
            lo, hi = spread["b_ci95"]
            log.info("spread calibration on %s (%d pairs): Z' = %.3f + %.3f Z (95%% range of the stretch %.2f-%.2f; "
                     "predicted SD %.2f -> %.2f)", fitted_on, spread["n"], spread["a"], spread["b"], lo, hi,
                     spread["sd_pred"], spread["sd_true"])
            if not (lo >= spread["b"] * (1 - SPREAD_TOLERANCE) and hi <= spread["b"] * (1 + SPREAD_TOLERANCE)):
                log.warning("the spread calibration rests on %d pairs (%s): its stretch may be off by more than "
                            "%d %% (95%% range %.2f-%.2f around %.2f), and so may the reported Z's spread%s",
                            spread["n"], fitted_on, round(100 * SPREAD_TOLERANCE), lo, hi, spread["b"],
                            "; --folds K fits it on out-of-fold predictions of every training pair"
                            if self.oof is None else "")
        elif self.z_spread != "none":
            log.warning("no spread calibration: too few pairs or no positive correlation (%s)", fitted_on)
        extra["residual_sd_z"] = float(np.std(z_true - spread_z(z_pred, extra), ddof=1))
        if tune_scored is None:  # an ensemble without a tuning split: fitted out of fold, no tuning table
            return None
        f, cands, bmd = tune_scored
        z_tune = spread_z(cands[chosen], extra)
        tune_path = out / "tune_predictions.csv"
        write_frame(predictions_table(f, z_tune, bmd, extra["residual_sd_z"], model_name=self.model_name,
                                      split="tune", z_parts=cands), tune_path)
        return tune_path

    def write_test(self, model: nn.Module, chosen: str, cfg: TrainConfig, out: Path
                   ) -> tuple[Path | None, dict[str, Any]]:
        """predictions.csv and regression.json for the test split (if any)."""
        if not len(self.preps["test"].frame):
            return None, {}
        f, cands, bmd = self.score(model, "test")
        preds = predictions_table(f, spread_z(cands[chosen], self.extra), bmd, self.extra["residual_sd_z"],
                                  model_name=self.model_name, split="test", z_parts=cands)
        test_path = out / "predictions.csv"
        write_frame(preds, test_path)
        regression = regression_metrics(preds, n_boot=200, seed=cfg.seed)
        (out / "regression.json").write_text(json.dumps(plain(regression), indent=1, default=str))
        return test_path, regression

    def final_card(self, card: dict[str, Any], chosen: str, selection: dict[str, dict[str, float]] | None,
                   regression: dict[str, Any]) -> dict[str, Any]:
        card = dict(card)
        card["residual_sd_z"] = self.extra["residual_sd_z"]
        card["z_from"] = chosen
        card["z_from_requested"] = self.z_from
        card["z_from_selection"] = selection
        card["z_spread"] = self.extra.get("z_spread") or {"method": "none" if self.z_spread == "none" else "not fitted"}
        card["model_selection"] = (
            "the last epoch (the end of the learning-rate schedule)" if self.member or self.oof is not None else
            ("tuning MAE of the predicted Z" + (" after the spread calibration" if self.sel_key == "mae_spread" else ""))
            if len(self.tune_frame) >= 2 else "lowest training loss (no tuning split)")
        if self.oof is not None:
            card["model_selection"] = (f"each member's epoch: {card['model_selection']}; the Z "
                                       f"source, spread and residual SD: {self.oof.described}")
        if self.reference is not None:
            card["z_reference_fit"] = {k: {"transform": c.transform, "n": c.n, "cv_rmse_z": c.rmse_z}
                                       for k, c in self.reference.curves.items()}
        card["test_regression"] = {k: v for k, v in regression.items() if k != "per_site"}
        return card

    def save(self, model: nn.Module, result: TrainResult, preps: dict[str, PreparedImages], cfg: TrainConfig,
             env: DistEnv, out: Path) -> PediatricTrainResult:
        """Rank 0: Z source, spread, predictions, regression metrics; the final artifact with its OOD part."""
        if not env.is_main:
            return PediatricTrainResult(out, result.artifact_path, None, None, {}, 1.0, result.history, self.dropped)
        from bonescreen.ood import attach_ood

        model = model.cpu().eval()
        tune_scored = self.score(model, "tune") if len(self.tune_frame) >= 2 else None
        chosen, selection = self.choose_z_from(tune_scored)
        tune_path = self.write_tune(tune_scored, chosen, out)
        test_path, regression = self.write_test(model, chosen, cfg, out)
        card = self.final_card(result.model_card, chosen, selection, regression)
        spec = replace(self.spec, extra=plain(self.extra), model_card=plain(card))
        save_artifact(result.artifact_path, model, spec)
        if not self.member:  # the OOD part (one class: a regression), on the training split, threshold on tuning
            attach_ood(result.artifact_path, preps["train"].source, None, preps["tune"].source,
                       quantile=cfg.ood_quantile)
        (out / "model_card.json").write_text(json.dumps(plain(card), indent=1, default=str))
        return PediatricTrainResult(
            out, result.artifact_path, test_path, tune_path, regression, float(self.extra["residual_sd_z"]),
            result.history, self.dropped, z_from=chosen, best_epoch=result.best_epoch, z_from_selection=selection,
        )


def train_pediatric(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_root: str | Path,
    resume: bool = False,
    model_name: str = "pediatric",
    bmd_weight: float = 0.5,
    z_from: str = "auto",
    z_spread: str = "match",
    shared: SharedFit | None = None,
) -> PediatricTrainResult:
    """Train the fusion model on the manifest's train split (best epoch by tuning Z MAE); score tune and test.

    ``z_from``: "auto" (lowest tuning MAE), "head", "reference" or "mean"; see the module docstring.
    ``z_spread``: "match" (default) stretches the reported Z so its mean and SD on the
    tuning split are the DXA Z's (:func:`bonescreen.pediatric.model.fit_spread`);
    "none" reports the regression's own, shrunken, Z. ``shared``: this run is one member of an
    ensemble (:mod:`bonescreen.training.crossfit`): the ensemble's standardisation and reference
    curve instead of its own, and no OOD part (nobody screens with a member alone).
    """
    if z_from not in Z_FROM_CHOICES:
        raise ValueError(f"z_from must be one of {Z_FROM_CHOICES}, got {z_from!r}")
    if z_spread not in Z_SPREADS:
        raise ValueError(f"z_spread must be one of {Z_SPREADS}, got {z_spread!r}")
    cfg = (config or load_config("pediatric-cpu-tiny")).validate()
    if cfg.selection != "tune":
        # the epoch is chosen on the tuning Z MAE (after the stretch); shifted copies are not scored here
        raise ConfigError(f"selection={cfg.selection!r} is not supported by the pediatric model; "
                          "it selects the epoch on the tuning Z MAE (selection: tune)")
    env = init_distributed(cfg.device)
    try:
        out = Path(out_dir)
        preps, dropped = pediatric_splits(manifest, cache_root, cfg, env)
        train_f = preps["train"].frame
        st, reference = ((shared.standardizer, shared.reference) if shared is not None else
                         (Standardizer.fit(clinical_of(train_f), targets_of(train_f)),
                          fit_reference(train_f, z_from, cfg.seed)))
        modes = z_modes(z_from, reference)
        spec = pediatric_spec(cfg, st, reference, modes)
        seed_everything(cfg.seed)
        pretrained, pretrained_desc = resolve_pretrained(cfg)
        model = FusionRegressor(
            cfg.arch, pretrained=pretrained, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
        )
        hooks = PediatricHooks(preps, spec, st, reference, modes, z_from, z_spread, bmd_weight, model_name, dropped,
                               cfg.eval_batch_size or 2 * cfg.batch_size, member=shared is not None)
        card = pediatric_card(cfg, model_name, pretrained_desc, preps, dropped, bmd_weight)
        return train_task(hooks, spec=spec, model=model, card=card, preps=preps, out=out, cfg=cfg, env=env,
                          resume=resume, model_name=model_name)
    finally:
        cleanup(env)
