"""Train the pediatric fusion model on the training stack (``bonescreen.train.fit``).

``train_pediatric`` writes into ``out_dir``:

    model.pt              the artifact (task "pediatric", fusion model, spec.extra)
    checkpoint.pt, metrics.csv, tensorboard/   from ``fit`` (resumable, DDP-ready)
    tune_predictions.csv  the tuning split (evaluate's --tune: thresholds)
    predictions.csv       the test split, in evaluate's predictions format plus
                          z_true, z_pred, bmd_true, bmd_pred
    regression.json       Pearson r, ICC, MAE on the test split
    model_card.json

Model selection: ``fit`` evaluates its tuning set with classification logits
from an image-only forward, which a fusion model does not have; so the tuning
split is used *after* training (residual SD for the score, thresholds, report)
and ``fit`` keeps the epoch with the lowest training loss.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonescreen.config import TrainConfig, load_config
from bonescreen.errors import TableError
from bonescreen.labels import PEDIATRIC_LOW_Z

log = logging.getLogger(__name__)

PREDICTION_ORDER = [
    "image_id", "patient_id", "site", "sex", "age", "height_cm", "weight_kg",
    "score", "label", "z_true", "z_pred", "bmd_true", "bmd_pred", "model", "split",
]


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


def predictions_table(
    frame: pd.DataFrame, z_pred: np.ndarray, bmd_pred: np.ndarray, residual_sd: float, *, model_name: str, split: str
) -> pd.DataFrame:
    """evaluate's predictions format: ``score`` = P(low BMD) from the predicted Z, ``label`` = DXA Z <= -2."""
    from bonescreen.pediatric.model import low_bmd_probability

    out = pd.DataFrame({"image_id": frame["image_id"].astype(str).to_numpy()})
    for col in ("patient_id", "site", "sex", "age", "height_cm", "weight_kg"):
        if col in frame.columns:
            out[col] = frame[col].to_numpy()
    out["score"] = low_bmd_probability(z_pred, residual_sd)
    out["label"] = frame["_y"].astype(int).to_numpy()
    out["z_true"] = frame["_z"].to_numpy()
    out["z_pred"] = np.round(z_pred, 4)
    out["bmd_true"] = frame["_bmd"].to_numpy()
    out["bmd_pred"] = np.round(bmd_pred, 4)
    out["model"] = model_name
    out["split"] = split
    return out[[c for c in PREDICTION_ORDER if c in out.columns]]


def train_pediatric(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    cache_root: str | Path,
    resume: bool = False,
    model_name: str = "pediatric",
    bmd_weight: float = 0.5,
) -> PediatricTrainResult:
    """Train the fusion model on the manifest's train split; score tune and test."""
    from bonescreen import __version__
    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.data import ManifestDataset, read_manifest, split_rows
    from bonescreen.distributed import cleanup, init_distributed
    from bonescreen.models import GRAY_MEAN, GRAY_STD
    from bonescreen.pediatric.data import (
        PediatricDataset,
        clinical_of,
        pediatric_rows,
        regression_loss,
        targets_of,
    )
    from bonescreen.pediatric.metrics import regression_metrics
    from bonescreen.pediatric.model import (
        CLINICAL_FEATURES,
        DEFAULT_HIDDEN,
        PEDIATRIC_ELIGIBILITY,
        TARGETS,
        FusionRegressor,
        Standardizer,
        predict_arrays,
    )
    from bonescreen.train import (
        TrainJob,
        _plain,
        _write_frame,
        fit,
        prepare_split,
        resolve_pretrained,
        seed_everything,
    )

    cfg = (config or load_config("pediatric-cpu-tiny")).validate()
    env = init_distributed(cfg.device)
    try:
        out = Path(out_dir)
        frame, dropped = pediatric_rows(read_manifest(manifest))
        splits = {s: split_rows(frame, s) for s in ("train", "tune", "test")}
        if len(splits["train"]) < 2:
            raise TableError("the manifest has fewer than 2 usable pediatric 'train' rows", reason="no_data")
        preps = {s: prepare_split(f, cache_root, cfg.image_size, cfg, env, cfg.progress and env.is_main)
                 for s, f in splits.items()}
        if preps["train"].frame.empty:
            raise TableError("no training image could be read", reason="no_data")
        train_f = preps["train"].frame
        st = Standardizer.fit(clinical_of(train_f), targets_of(train_f))
        extra: dict[str, Any] = {
            "kind": "fusion_regressor",
            "clinical_features": list(CLINICAL_FEATURES),
            "sex_coding": {"F": 1.0, "M": 0.0},
            "targets": list(TARGETS),
            "target_columns": {"z": "z_lumbar_spine", "bmd": "bmd_lumbar_spine"},
            "hidden": DEFAULT_HIDDEN,
            "z_threshold": PEDIATRIC_LOW_Z,
            "residual_sd_z": 1.0,
            **st.to_extra(),
        }
        spec = ModelSpec.for_task(
            cfg.arch,
            "pediatric",
            preprocess={"method": "truncation", "size": int(cfg.image_size), "mean": GRAY_MEAN, "std": GRAY_STD},
            threshold=0.5,
            eligibility=dict(PEDIATRIC_ELIGIBILITY),
            extra=extra,
        )
        seed_everything(cfg.seed)
        pretrained, pretrained_desc = resolve_pretrained(cfg)
        model = FusionRegressor(
            cfg.arch, pretrained=pretrained, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
        )
        images = ManifestDataset(
            preps["train"].source, train_f["_y"].to_numpy(), augment=cfg.augment, strong_p=cfg.strong_p, seed=cfg.seed
        )
        train_ds = PediatricDataset(images, clinical_of(train_f), targets_of(train_f), st)
        card: dict[str, Any] = {
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
            "config": cfg.to_dict(),
            "bonescreen_version": __version__,
        }
        empty = train_f.iloc[0:0]
        job = TrainJob(
            task="pediatric",
            spec=spec,
            model=model,
            train_ds=train_ds,  # type: ignore[arg-type]
            tune_ds=None,
            tune_frame=empty,
            test_ds=None,
            test_frame=empty,
            loss_fn=regression_loss(bmd_weight),
            model_card=card,
            model_name=model_name,
        )
        result = fit(job, out, cfg, env, resume=resume)
        if not env.is_main:
            return PediatricTrainResult(out, result.artifact_path, None, None, {}, 1.0, result.history, dropped)

        model = model.cpu().eval()

        def score(name: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
            p = preps[name]
            imgs = p.source.batch(np.arange(len(p.frame)))
            z, bmd = predict_arrays(
                model, imgs, clinical_of(p.frame), extra, mean=GRAY_MEAN, std=GRAY_STD,
                batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
            )
            return p.frame, z, bmd

        tune_path = test_path = None
        if len(preps["tune"].frame) >= 2:
            f, z, bmd = score("tune")
            extra["residual_sd_z"] = float(np.std(f["_z"].to_numpy() - z, ddof=1))
            tune_path = out / "tune_predictions.csv"
            _write_frame(predictions_table(f, z, bmd, extra["residual_sd_z"], model_name=model_name, split="tune"),
                         tune_path)
        else:
            log.warning("no tuning split: the low-BMD score uses a residual SD of 1.0")
        regression: dict[str, Any] = {}
        if len(preps["test"].frame):
            f, z, bmd = score("test")
            preds = predictions_table(f, z, bmd, extra["residual_sd_z"], model_name=model_name, split="test")
            test_path = out / "predictions.csv"
            _write_frame(preds, test_path)
            regression = regression_metrics(preds, n_boot=200, seed=cfg.seed)
            (out / "regression.json").write_text(json.dumps(_plain(regression), indent=1, default=str))
        card = dict(result.model_card)
        card["residual_sd_z"] = extra["residual_sd_z"]
        card["test_regression"] = {k: v for k, v in regression.items() if k != "per_site"}
        spec = replace(spec, extra=_plain(extra), model_card=_plain(card))
        save_artifact(result.artifact_path, model, spec)
        (out / "model_card.json").write_text(json.dumps(_plain(card), indent=1, default=str))
        return PediatricTrainResult(
            out, result.artifact_path, test_path, tune_path, regression, float(extra["residual_sd_z"]),
            result.history, dropped,
        )
    finally:
        cleanup(env)
