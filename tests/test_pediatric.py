"""Pediatric variant: phantom mode, Z-only cohort, fusion model, Z threshold, SHAP, train/evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bonescreen.errors import ModelArtifactError, TableError

ARCH = "resnet10t"


# --- phantom -----------------------------------------------------------------------------


def test_growth_references_are_monotone_and_invertible() -> None:
    from bonescreen.phantom.pediatric import (
        bmd_reference,
        bmd_to_z,
        height_reference,
        z_to_bmd,
    )

    ages = np.linspace(0, 17.9, 50)
    for sex in ("F", "M"):
        assert np.all(np.diff(bmd_reference(ages, sex)) > 0)
        assert np.all(np.diff(height_reference(ages, sex)[0]) >= 0)
        z = np.linspace(-6, 3, 50)
        np.testing.assert_allclose(bmd_to_z(z_to_bmd(z, ages, sex), ages, sex), z, atol=1e-9)
        assert np.all(z_to_bmd(-7.0, ages, sex) > 0)  # never a negative density


def test_population_prevalence_and_healthy_reference() -> None:
    from bonescreen.phantom.pediatric import build_site, default_pediatric_sites, low_bmd

    for spec in default_pediatric_sites():
        b = build_site(spec, 6000, seed=1)
        assert abs(low_bmd(b["z_meas"]).mean() - spec.prevalence) < 0.025
        healthy = b["latent"][~b["kids"]["ill"]]
        # Z-scores of healthy children are standard normal against the reference
        assert abs(healthy.mean()) < 0.08 and abs(healthy.std() - 1.0) < 0.06
        ages = b["kids"]["age"]
        assert ages.min() >= 0 and ages.max() < 18
        assert 11 <= np.median(ages) <= 14
        # disease stunts growth: ill children are shorter for their age
        assert b["kids"]["haz"][b["kids"]["ill"]].mean() < b["kids"]["haz"][~b["kids"]["ill"]].mean() - 0.2


def test_child_image_shows_absolute_mineral() -> None:
    from bonescreen.phantom import PatientRecord, render_patient_image
    from bonescreen.phantom.pediatric import image_density

    def bone(age: float, z: float, height: float, weight: float) -> float:
        d = float(image_density(z, age, "M"))
        p = PatientRecord("K-1", "PED", 1, "M", age, height, weight, d, pediatric=True)
        img = render_patient_image(p, size=64, seed=0)
        return float(img.attenuation[img.bone_mask].mean() - img.attenuation[~img.bone_mask].mean())

    # same child, lower Z -> less bone contrast; same Z, older child -> more mineral
    assert bone(14.0, -3.0, 160, 48) < bone(14.0, 0.0, 160, 48)
    assert float(image_density(0.0, 4.0, "F")) < float(image_density(0.0, 16.0, "F"))


def test_pediatric_site_needs_child_ages() -> None:
    from bonescreen.phantom import PhantomError, SiteSpec

    with pytest.raises(PhantomError, match="pediatric"):
        SiteSpec(name="KIDS", pediatric=True)  # adult default ages


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pediatric phantom -> cohort -> one-epoch fusion model, shared by the tests below."""
    from bonescreen.cli import main
    from bonescreen.config import load_config
    from bonescreen.training.pediatric import train_pediatric

    root = tmp_path_factory.mktemp("ped")
    assert main(["pediatric", "phantom", str(root / "ph"), "--n-per-site", "26", "--size", "48", "--quiet"]) == 0
    assert main(["pediatric", "cohort", str(root / "ph"), str(root / "co")]) == 0
    cfg = load_config("pediatric-cpu-tiny", {
        "arch": ARCH, "pretrained": None, "image_size": 48, "epochs": 2, "batch_size": 8,
        "progress": False, "tensorboard": False, "device": "cpu",
    })
    res = train_pediatric(root / "co" / "manifest.csv", root / "run", cfg, cache_root=root / "cache")
    return {"root": root, "phantom": root / "ph", "manifest": root / "co" / "manifest.csv",
            "model": res.artifact_path, "preds": root / "run" / "predictions.csv",
            "tune": root / "run" / "tune_predictions.csv", "cache": root / "cache",
            "metrics": root / "run" / "metrics.csv", "card": root / "run" / "model_card.json",
            "result": res}  # type: ignore[dict-item]


def test_phantom_files_and_oracle(run: dict[str, Path]) -> None:
    from bonescreen.phantom.pediatric import DXA_COLUMNS, bmd_to_z

    ph = run["phantom"]
    dxa = pd.read_csv(ph / "PED" / "dxa.csv")
    assert list(dxa.columns) == DXA_COLUMNS
    assert not any(c.startswith("t_") for c in dxa.columns)
    # BMD and Z agree through the age- and sex-matched reference (rounding aside)
    z_back = bmd_to_z(dxa["bmd_lumbar_spine"], dxa["age"] + 0.05, dxa["sex"].to_numpy())
    assert np.abs(z_back - dxa["z_lumbar_spine"]).max() < 0.25
    oracle = json.loads((ph / "oracle.json").read_text())
    truth = pd.read_csv(ph / "truth_pediatric.csv")
    for site in ("PED", "PED_EXT"):
        o = oracle[site]
        assert {"auc", "r", "r_bmd", "prevalence", "n"} <= set(o)
        t = truth[truth["site"] == site]
        assert o["r"] == pytest.approx(np.corrcoef(t["latent"], t["z_lumbar_spine"])[0, 1], abs=1e-3)
        assert (t["low_bmd"] == (t["z_lumbar_spine"] <= -2.0)).all()


# --- cohort --------------------------------------------------------------------------------


def test_cohort_accepts_z_only_exports() -> None:
    from bonescreen.cohort import read_dxa

    df = pd.DataFrame({
        "patient_id": ["a", "b", "c"], "exam_date": ["2020-01-01"] * 3, "sex": ["F", "M", "F"],
        "age": ["7.5", "12", "15"], "z_lumbar_spine": ["-2.3", "", "0.4"],
        "height_cm": ["120", "150", "160"], "weight_kg": ["22", "40", "50"],
    })
    table = read_dxa(df, site="S")
    assert sorted(table.exams["patient_id"]) == ["a", "c"]
    assert table.rejected["reason"].tolist() == ["no_label"]
    assert table.exams.set_index("patient_id").loc["a", "z_lumbar_spine"] == -2.3
    with pytest.raises(TableError, match="Z-score"):
        read_dxa(df.drop(columns=["z_lumbar_spine"]), site="S")


def test_cohort_keeps_children_and_clinical_columns(run: dict[str, Path]) -> None:
    m = pd.read_csv(run["manifest"])
    assert m["age"].between(0, 17.99).all()
    assert {"z_lumbar_spine", "bmd_lumbar_spine", "height_cm", "weight_kg"} <= set(m.columns)
    assert set(m["split"]) == {"train", "tune", "test"}


# --- model ---------------------------------------------------------------------------------


def test_fusion_model_shapes_and_clinical_required() -> None:
    from bonescreen.pediatric.model import FusionRegressor

    torch.manual_seed(0)
    m = FusionRegressor(ARCH, hidden=16).eval()
    x = torch.randn(3, 1, 64, 64)
    c = torch.randn(3, 4)
    with torch.no_grad():
        assert m(x, c).shape == (3, 2)
        assert m.image_embedding(x).shape == (3, m.backbone.num_features)
        assert m.forward_features(x).ndim == 4
        # the clinical branch matters: other clinical values, other output
        assert not torch.allclose(m(x, c), m(x, c + 1.0))
    with pytest.raises(ModelArtifactError, match="clinical"):
        m(x)
    with pytest.raises(ModelArtifactError):
        m(x, torch.randn(3, 3))


def test_z_threshold_and_score() -> None:
    from bonescreen.pediatric.data import pediatric_rows
    from bonescreen.pediatric.model import low_bmd_probability

    assert low_bmd_probability(np.array([-2.0]), 0.7)[0] == pytest.approx(0.5)
    p = low_bmd_probability(np.array([-3.0, -2.1, -1.9, 0.0]), 0.7)
    assert np.all(np.diff(p) < 0) and p[1] > 0.5 > p[2]
    frame = pd.DataFrame({
        "path": list("abcde"), "z_lumbar_spine": [-2.0, -1.9, -2.04, -3.0, None], "age": [10] * 5,
        "sex": ["F", "M", "F", "M", "F"], "height_cm": [140] * 5, "weight_kg": [30, 30, 30, None, 30],
    })
    rows, dropped = pediatric_rows(frame)
    assert rows["_y"].tolist() == [1, 0, 1]  # Z <= -2.0 after rounding to one decimal
    assert dropped == {"missing_clinical:weight_kg": 1, "no_z_score": 1}


def test_spread_calibration_undoes_shrinkage_on_known_data() -> None:
    """A least-squares prediction of Z is shrunk by r; moment matching on tuning pairs restores the SD."""
    from bonescreen.pediatric.model import fit_spread, spread_z

    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(-0.8, 1.6, n)
        signal = z + rng.normal(0, 1.2, n)  # r(signal, z) = 0.8
        slope = np.cov(signal, z)[0, 1] / np.var(signal)  # the regression of z on the signal
        return z, z.mean() + slope * (signal - signal.mean())

    z_tune, p_tune = draw(400)
    assert np.std(p_tune) < 0.85 * np.std(z_tune)  # shrunk toward the mean
    sp = fit_spread(z_tune, p_tune)
    assert sp is not None and sp["b"] == pytest.approx(1 / 0.8, rel=0.1)
    z_new, p_new = draw(2000)  # a fresh sample of the same site
    extra = {"z_spread": sp}
    cal = spread_z(p_new, extra)
    assert abs(np.std(cal) / np.std(z_new) - 1) < 0.08
    assert abs(np.mean(cal) - np.mean(z_new)) < 0.1
    assert np.corrcoef(cal, z_new)[0, 1] == pytest.approx(np.corrcoef(p_new, z_new)[0, 1])  # ranking untouched
    # the count below the cut-off comes back: shrunk predictions miss children with Z <= -2
    true_low = (z_new <= -2).mean()
    assert (p_new <= -2).mean() < 0.85 * true_low and abs((cal <= -2).mean() - true_low) < 0.2 * true_low
    # the bootstrap range of the stretch holds the truth and narrows with more pairs (~1/sqrt(n))
    lo, hi = fit_spread(z_tune, p_tune, n_boot=400)["b_ci95"]
    assert lo < 1 / 0.8 < hi and lo < sp["b"] < hi
    lo30, hi30 = fit_spread(z_tune[:30], p_tune[:30], n_boot=400)["b_ci95"]
    assert (hi30 - lo30) > 2.5 * (hi - lo)
    assert "b_ci95" not in sp  # only when asked (the per-epoch selection fits it many times)
    # refused without signal or pairs; identity without a fitted spread
    assert fit_spread(z_tune[:5], p_tune[:5]) is None
    assert fit_spread(z_tune, -p_tune) is None
    np.testing.assert_array_equal(spread_z(p_new, {}), p_new)
    # selection after the stretch is not fooled by shrinkage: the shrunk regression has the lower
    # raw MAE, but both have the same MAE once stretched (the stretch is affine-invariant)
    from bonescreen.training.pediatric import z_agreement

    loose, tight = z_agreement(z_tune, spread_z(p_tune, extra)), z_agreement(z_tune, p_tune)
    assert tight["mae"] < loose["mae"]
    assert tight["mae_spread"] == pytest.approx(loose["mae_spread"], abs=1e-9)


def test_artifact_round_trip_and_predict_pediatric(run: dict[str, Path]) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.pediatric import predict_pediatric

    loaded = load_artifact(run["model"], expected_task="pediatric")
    assert loaded.spec.eligibility["max_age"] == 17.99 and loaded.spec.eligibility["min_age"] == 0
    assert loaded.spec.extra["residual_sd_z"] > 0
    # `pediatric train` ends by fitting the OOD part (one class) on the image embedding
    assert loaded.spec.ood and loaded.spec.ood["weights_fingerprint"] == loaded.fingerprint
    blocks = loaded.spec.ood["blocks"]
    assert blocks[0]["name"] == "penultimate" and all(b["means"].shape[0] == 1 for b in blocks)
    assert loaded.features(np.zeros((2, loaded.size, loaded.size),
                                                                                np.uint8)).shape[0] == 2
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, loaded.size, loaded.size), dtype=np.uint8)
    clin = pd.DataFrame({"age": [5.0, 12.0, 15.0], "sex": ["F", "M", "F"],
                         "height_cm": [110, 150, None], "weight_kg": [18, 40, 50]})
    out = predict_pediatric(loaded, imgs, clin)
    assert list(out.columns) == ["pred_z", "pred_bmd", "prob_low_bmd", "low_bmd", "reason"]
    assert out["reason"].tolist() == ["", "", "missing_clinical:height_cm"]
    assert out["pred_z"].iloc[:2].notna().all() and np.isnan(out["pred_z"].iloc[2])
    assert (out["low_bmd"].iloc[:2].astype(bool) == (out["pred_z"].iloc[:2] <= -2.0)).all()
    assert ((out["prob_low_bmd"].iloc[:2] >= 0.5) == out["low_bmd"].iloc[:2].astype(bool)).all()
    # the predictions table and the artifact agree
    preds = pd.read_csv(run["preds"])
    assert {"score", "label", "z_true", "z_pred", "bmd_pred"} <= set(preds.columns)
    assert preds["score"].between(0, 1).all()
    with pytest.raises(ModelArtifactError, match="clinical"):
        loaded.predict_proba(imgs)


# --- model selection (fit's evaluate_fn hook) -----------------------------------------------


class _ToyData(torch.utils.data.Dataset):
    """16 tiny 'images' with a regression target: enough for fit's loop, nothing else."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 4, 4, generator=g)
        self.t = self.x.mean(dim=(1, 2, 3))
        self.labels = np.zeros(n, dtype=int)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "target": self.t[i]}


def _toy_fit(tmp_path: Path, scores: list[float], patience: int | None) -> tuple:  # type: ignore[type-arg]
    from bonescreen.artifact import ModelSpec
    from bonescreen.config import load_config
    from bonescreen.distributed import DistEnv
    from bonescreen.training.loop import TrainJob, fit
    from bonescreen.training.selection import CallbackEvaluation

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    calls: list[dict[str, torch.Tensor]] = []

    def evaluate_fn(m: torch.nn.Module, env: DistEnv) -> tuple[dict[str, float], float]:
        assert m is model and isinstance(env, DistEnv)
        calls.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"tune_toy": float(len(calls))}, scores[len(calls) - 1]

    def loss_fn(m: torch.nn.Module, x: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(x).squeeze(1), b["target"])

    ds = _ToyData()
    cfg = load_config("cpu-tiny", {"epochs": len(scores), "batch_size": 8, "progress": False, "tensorboard": False,
                                   "device": "cpu", "balance": "none", "early_stopping_patience": patience,
                                   "warmup_epochs": 0, "lr": 0.05})
    job = TrainJob(task="stage2", spec=ModelSpec.for_task("toy", "stage2"), model=model, train_ds=ds,  # type: ignore[arg-type]
                   loss_fn=loss_fn, evaluation=CallbackEvaluation(evaluate_fn), model_card={})
    return fit(job, tmp_path, cfg, DistEnv()), calls


def test_fit_evaluate_fn_picks_the_best_epoch(tmp_path: Path) -> None:
    scores = [0.1, 0.7, 0.3, 0.2]
    res, calls = _toy_fit(tmp_path, scores, patience=None)
    assert len(calls) == 4  # once per epoch
    assert res.best_epoch == 2 == int(np.argmax(scores)) + 1
    # the artifact holds the weights evaluate_fn saw at the best epoch, not the last ones
    saved = torch.load(res.artifact_path, weights_only=True)["state_dict"]
    for k, v in calls[1].items():
        torch.testing.assert_close(saved[k], v)
    assert not torch.equal(saved["1.weight"], calls[-1]["1.weight"])
    metrics = pd.read_csv(res.metrics_csv)
    assert metrics["tune_toy"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert metrics["best"].tolist() == [True, True, False, False]
    assert "tune_auc" not in metrics.columns
    assert res.predictions_path is None  # the built-in (classification) test evaluation is replaced too


def test_fit_evaluate_fn_drives_early_stopping(tmp_path: Path) -> None:
    res, calls = _toy_fit(tmp_path, [0.5, 0.9, 0.4, 0.3, 0.95, 0.99], patience=2)
    assert len(calls) == 4 and res.stopped == "early_stopping"
    assert res.best_epoch == 2


# --- reference curve: BMD -> Z as the scanner computes it ------------------------------------


def _synthetic_dxa(n: int, *, log_normal: bool, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Children with a known reference: linear-scale mu/sigma, or log-normal (LMS with L = 0)."""
    rng = np.random.default_rng(seed)
    age = np.round(rng.uniform(1, 17.9, n), 1)
    sex = (rng.random(n) < 0.5).astype(float)
    z = np.round(rng.normal(-0.7, 1.4, n), 1)
    mu, sd = _known(age, sex, log_normal)
    y = mu + z * sd
    bmd = np.exp(y) if log_normal else y
    return age, sex, z, np.round(bmd, 4)


def _known(age: np.ndarray, sex: np.ndarray, log_normal: bool) -> tuple[np.ndarray, np.ndarray]:
    centre = np.where(sex == 1, 11.5, 13.5)
    mu = 0.35 + 0.025 * age + 0.3 / (1 + np.exp(-(age - centre) / 1.8))
    if log_normal:
        return np.log(mu), 0.10 + 0.002 * age
    return mu, 0.04 + 0.004 * age


@pytest.mark.parametrize("log_normal", [False, True])
def test_reference_curve_recovers_known_mu_sigma(log_normal: bool) -> None:
    from bonescreen.pediatric.reference import ReferenceCurves

    age, sex, z, bmd = _synthetic_dxa(400, log_normal=log_normal)
    ref = ReferenceCurves.fit(age, sex, z, bmd)
    assert {c.transform for c in ref.curves.values()} == {"log" if log_normal else "linear"}
    grid = np.linspace(2, 17, 31)
    for code in (0.0, 1.0):
        mu, sd = _known(grid, np.full_like(grid, code), log_normal)
        mu_hat, sd_hat, _ = ref.mu_sigma(grid, np.full_like(grid, code))
        assert np.max(np.abs(mu_hat - mu) / sd) < 0.1  # mu within 0.1 SD at every age
        assert np.max(np.abs(sd_hat / sd - 1)) < 0.1
    # new children (not rounded): Z from BMD as the scanner would, and back
    a2, s2, z2, _ = _synthetic_dxa(300, log_normal=log_normal, seed=1)
    mu2, sd2 = _known(a2, s2, log_normal)
    b2 = mu2 + z2 * sd2
    b2 = np.exp(b2) if log_normal else b2
    z_hat = ref.z(b2, a2, s2)
    assert np.sqrt(np.mean((z_hat - z2) ** 2)) < 0.08
    # plain floats/lists only: survives JSON (and torch's weights_only loader)
    again = ReferenceCurves.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_allclose(again.z(b2, a2, s2), z_hat)
    np.testing.assert_allclose(again.curves["F"].bmd(z_hat[:5], a2[:5]), ref.curves["F"].bmd(z_hat[:5], a2[:5]))


def test_reference_curve_refuses_too_little_data_and_pools_a_rare_sex() -> None:
    from bonescreen.pediatric.reference import ReferenceCurves, ReferenceFitError

    age, sex, z, bmd = _synthetic_dxa(300, log_normal=False)
    with pytest.raises(ReferenceFitError, match="too few"):
        ReferenceCurves.fit(age[:6], sex[:6], z[:6], bmd[:6])
    keep = (sex == 0) | (np.arange(len(sex)) < 12)  # only a handful of girls
    n_girls = int((sex[keep] == 1).sum())
    assert 0 < n_girls < 14
    ref = ReferenceCurves.fit(age[keep], sex[keep], z[keep], bmd[keep])
    assert ref.curves["F"].n == int(keep.sum())  # the pooled curve (all children)
    assert ref.curves["M"].n == int((sex[keep] == 0).sum())


def test_reference_z_in_artifact_and_predictions(run: dict[str, Path]) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.pediatric import predict_pediatric
    from bonescreen.pediatric.model import (
        Z_SOURCES,
        predict_outputs,
        reference_of,
        sex_code,
        spread_z,
    )

    loaded = load_artifact(run["model"], expected_task="pediatric")
    extra = loaded.spec.extra
    assert extra["z_from"] in Z_SOURCES and extra["z_reference"]
    json.dumps(extra)  # plain types only
    ref = reference_of(extra)
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (4, loaded.size, loaded.size), dtype=np.uint8)
    clin = pd.DataFrame({"age": [4.0, 9.5, 13.0, 16.5], "sex": ["F", "M", "M", "F"],
                         "height_cm": [100, 135, 155, 165], "weight_kg": [16, 30, 45, 55]})
    raw = clin.assign(sex=[sex_code(v) for v in clin["sex"]]).to_numpy(float)
    z_head, bmd = predict_outputs(loaded.model, imgs, raw, extra, mean=float(loaded.spec.preprocess["mean"]),
                                  std=float(loaded.spec.preprocess["std"]))
    z_ref = ref.z(bmd, raw[:, 0], raw[:, 1])
    expected = {"head": z_head, "reference": z_ref, "mean": 0.5 * (z_head + z_ref)}
    for src in Z_SOURCES:
        extra["z_from"] = src
        out = predict_pediatric(loaded, imgs, clin)
        want = spread_z(expected[src], extra)  # the tuning split's stretch, when one was fitted
        np.testing.assert_allclose(out["pred_z"].to_numpy(float), want, atol=1e-6)
        np.testing.assert_allclose(out["pred_bmd"].to_numpy(float), bmd, atol=1e-6)
        assert (out["low_bmd"].astype(bool).to_numpy() == (want <= -2.0)).all()
    # the tables carry both ingredients; z_pred is the one the artifact chose
    tune = pd.read_csv(run["tune"])
    chosen = load_artifact(run["model"]).spec.extra["z_from"]
    parts = {"head": tune["z_pred_head"], "reference": tune["z_pred_ref"],
             "mean": 0.5 * (tune["z_pred_head"] + tune["z_pred_ref"])}
    np.testing.assert_allclose(tune["z_pred"], spread_z(parts[chosen], extra), atol=2e-4)


def test_train_pediatric_selects_on_tuning_mae(run: dict[str, Path]) -> None:
    res = run["result"]
    card = json.loads(run["card"].read_text())
    metrics = pd.read_csv(run["metrics"])
    assert card["model_selection"].startswith("tuning MAE")
    # the default z_spread=match selects on the MAE after the stretch (raw MAE would reward shrinkage)
    assert card["model_selection"].endswith("after the spread calibration")
    key = "mae_spread"
    cols = [f"tune_{key}_z_{m}" for m in ("head", "reference", "mean")]
    assert set(cols) <= set(metrics.columns) and len(metrics) == 2
    # best epoch = the one with the lowest tuning MAE (over the three Z sources: z_from=auto)
    best = int(metrics[cols].min(axis=1).to_numpy().argmin()) + 1
    assert res.best_epoch == best == card["best_epoch"]
    assert metrics["best"].astype(bool).tolist()[best - 1]
    # z_from=auto took the source with the lowest tuning MAE at that epoch, recomputed from the table
    from bonescreen.training.pediatric import z_agreement

    tune = pd.read_csv(run["tune"])
    parts = {"head": tune["z_pred_head"], "reference": tune["z_pred_ref"],
             "mean": 0.5 * (tune["z_pred_head"] + tune["z_pred_ref"])}
    mae = {m: z_agreement(tune["z_true"], p)[key] for m, p in parts.items()}
    assert card["z_from"] == min(mae, key=mae.get)
    for m, v in mae.items():
        assert card["z_from_selection"][m][key] == pytest.approx(v, abs=1e-3)
        assert metrics[f"tune_{key}_z_{m}"].iloc[best - 1] == pytest.approx(v, abs=1e-3)
        raw = np.mean(np.abs(tune["z_true"] - parts[m]))
        assert metrics[f"tune_mae_z_{m}"].iloc[best - 1] == pytest.approx(raw, abs=1e-3)


# --- explanation ---------------------------------------------------------------------------


@pytest.mark.parametrize("z_from", ["head", "reference", "mean"])
def test_shap_is_exact_and_gradcam_shape(run: dict[str, Path], z_from: str) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.pediatric.explain import clinical_shap, gradcam_low_bmd

    loaded = load_artifact(run["model"])
    loaded.spec.extra["z_from"] = z_from  # SHAP explains the Z the artifact reports, whatever its source
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, loaded.size, loaded.size), dtype=np.uint8)
    clin = np.array([[6.0, 1.0, 115.0, 20.0], [15.0, 0.0, 170.0, 60.0]])
    bg = np.column_stack([rng.uniform(2, 17, 20), np.ones(20), rng.uniform(90, 180, 20), rng.uniform(12, 70, 20)])
    sh = clinical_shap(loaded, imgs, clin, bg)
    assert sh.values.shape == (2, 4)
    res = loaded.predict_pediatric(imgs, clin)
    np.testing.assert_allclose(sh.base + sh.values.sum(axis=1), res["z"], atol=1e-4)
    # every background child is female: sex carries no SHAP for the girl, some for the boy
    assert abs(sh.values[0, 1]) < 1e-6
    assert abs(sh.values[1, 1]) > 0
    cams = gradcam_low_bmd(loaded, imgs, clin)
    assert cams.shape == (2, loaded.size, loaded.size)
    assert cams.min() >= 0 and cams.max() <= 1


def test_explain_cli_writes_patient_figures(run: dict[str, Path]) -> None:
    from bonescreen.cli import main

    out = run["root"] / "explain"
    assert main(["pediatric", "explain", str(run["model"]), str(run["manifest"]), str(out),
                 "--cache", str(run["cache"]), "--limit", "2", "--no-progress"]) == 0
    table = pd.read_csv(out / "shap.csv")
    assert len(table) == 2
    assert {"shap_age", "shap_sex", "shap_height_cm", "shap_weight_kg", "dxa_z", "pred_z"} <= set(table.columns)
    np.testing.assert_allclose(table["shap_base"] + table.filter(like="shap_").drop(columns="shap_base").sum(axis=1),
                               table["pred_z"], atol=1e-4)
    for png in table["png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


# --- evaluation ----------------------------------------------------------------------------


def test_icc_properties() -> None:
    from bonescreen.pediatric.metrics import icc_2_1

    rng = np.random.default_rng(0)
    a = rng.normal(size=2000)
    assert icc_2_1(a, a) == pytest.approx(1.0)
    # absolute agreement: a constant bias lowers ICC(2,1) although r stays 1
    assert icc_2_1(a, a + 1.0) < 0.75
    assert abs(icc_2_1(a, rng.normal(size=2000))) < 0.1
    # two raters agreeing up to noise of SD 0.5 on unit-variance subjects: ICC = 1 / 1.25
    b = a + rng.normal(0, 0.5, 2000)
    c = a + rng.normal(0, 0.5, 2000)
    assert icc_2_1(b, c) == pytest.approx(0.8, abs=0.03)


def test_evaluate_cli_regression_and_classification(run: dict[str, Path]) -> None:
    from bonescreen.cli import main

    out = run["root"] / "report"
    assert main(["pediatric", "evaluate", str(run["preds"]), "--tune", str(run["tune"]),
                 "--oracle", str(run["phantom"] / "oracle.json"), "--out", str(out),
                 "--bootstrap", "50", "--no-progress"]) == 0
    reg = json.loads((out / "regression.json").read_text())
    preds = pd.read_csv(run["preds"])
    r = np.corrcoef(preds["z_true"], preds["z_pred"])[0, 1]
    assert reg["z"]["pearson_r"]["value"] == pytest.approx(r, abs=1e-9)
    assert reg["z"]["mae"]["value"] == pytest.approx(np.mean(np.abs(preds["z_true"] - preds["z_pred"])))
    assert "PED" in reg["oracle"]
    assert (out / "bland_altman_z.png").is_file()
    metrics = json.loads((out / "classification" / "metrics.json").read_text())
    assert metrics  # the standard report ran on score = P(Z <= -2)


def test_agreement_cis_resample_children_not_images() -> None:
    """Two images per child carry one child's information: the patient bootstrap says so, the image one does not."""
    from bonescreen.pediatric.metrics import agreement

    rng = np.random.default_rng(3)
    z = rng.normal(-1, 1.5, 60)
    err = rng.normal(0, 0.8, 60)
    t = np.repeat(z, 2)
    p = np.repeat(z + err, 2) + rng.normal(0, 0.01, 120)
    kids = np.repeat(np.arange(60), 2)
    by_child = agreement(t, p, groups=kids, n_boot=400, seed=0)
    by_image = agreement(t, p, n_boot=400, seed=0)
    assert by_child["bootstrap"]["unit"] == "patient" and by_child["bootstrap"]["n_units"] == 60
    assert by_image["bootstrap"]["unit"] == "image"
    width = {k: a["mae"]["hi"] - a["mae"]["lo"] for k, a in (("child", by_child), ("image", by_image))}
    assert width["child"] > 1.2 * width["image"]  # ~sqrt(2) wider: 60 children, not 120 independent images
    assert by_child["pearson_r"]["method"] == "patient bootstrap"
    assert by_child["mae"]["value"] == pytest.approx(np.mean(np.abs(p - t)))


# --- a pediatric cohort from a DICOM folder and a workstation export (not a phantom folder) ----


def _phantom_as_export():  # scripts/phantom_as_export.py, the helper the README uses too
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "phantom_as_export.py"
    spec = importlib.util.spec_from_file_location("phantom_as_export", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def real(run: dict[str, Path]) -> dict[str, Path]:
    from bonescreen.cli import main

    root = run["root"] / "real"
    export = _phantom_as_export()
    paths = {s: export.export_site(run["phantom"] / s, root / s, "lunar", seed=k) for k, s in enumerate(("PED", "PED_EXT"))}
    assert not (root / "PED" / "dxa.csv").exists() and not (root / "phantom.json").exists()
    args = ["pediatric", "cohort", str(root / "co"), "--columns", "lunar", "--date-format", "%m/%d/%Y"]
    for s, p in paths.items():
        args += ["--site", s, str(p["dicom"]), str(p["dxa"])]
    assert main(args) == 0
    return {"root": root, "manifest": root / "co" / "manifest.csv", "exclusions": root / "co" / "exclusions.csv",
            "flow": root / "co" / "flow.json", **{f"dxa_{s}": p["dxa"] for s, p in paths.items()}}


def test_cohort_from_dicom_folder_and_lunar_export(real: dict[str, Path], run: dict[str, Path]) -> None:
    m = pd.read_csv(real["manifest"], dtype={"patient_id": str})
    raw = pd.read_csv(real["dxa_PED"], dtype=str)
    assert "Patient ID" in raw.columns and "L1-L4 Z-Score" in raw.columns  # the workstation's names
    assert set(m["site"]) == {"PED", "PED_EXT"}
    assert m["age"].between(0, 17.99).all()
    # Z-scores are the labels; the export's (adult) T-scores are ignored for children
    assert m["z_lumbar_spine"].notna().all() and m["t_lumbar_spine"].isna().all()
    assert "z_total_body_less_head" in m.columns and m["z_total_body_less_head"].notna().any()
    # decimal commas read as numbers; ages from the birth dates
    assert m["height_cm"].between(30, 250).all() and m["weight_kg"].gt(0).all()
    # several pairs per child, never a child in two splits
    per_child = m.groupby("patient_id").size()
    assert per_child.max() >= 2
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(m.loc[m["site"] == "PED", "split"]) == {"train", "tune", "test"}
    assert set(m.loc[m["site"] == "PED_EXT", "split"]) == {"test"}
    # every bad row is an exclusion with its reason, and the flow adds up
    ex = pd.read_csv(real["exclusions"])
    reasons = ex["reason"].value_counts().to_dict()
    assert reasons.get("duplicate_row") == 2 and reasons.get("no_label") == 2
    assert reasons.get("implausible_height") == 2  # a height in metres: a model input is refused, not guessed
    steps = json.loads(real["flow"].read_text())["steps"]
    n_export = sum(len(pd.read_csv(real[f"dxa_{s}"])) for s in ("PED", "PED_EXT"))
    assert steps[0]["remaining"] == n_export
    assert steps[-1]["remaining"] == len(m)
    for a, b in zip(steps, steps[1:]):
        assert a["remaining"] - b["excluded"] == b["remaining"]


def test_real_pediatric_cohort_trains_and_evaluates(real: dict[str, Path]) -> None:
    """`pediatric train` and `pediatric evaluate` read the manifest unchanged."""
    from bonescreen.cli import main

    out = real["root"] / "run"
    assert main(["pediatric", "train", str(real["manifest"]), "--out", str(out), "--cache", str(real["root"] / "cache"),
                 "--set", f"arch={ARCH}", "--set", "pretrained=none", "--set", "image_size=48", "--set", "epochs=1",
                 "--set", "batch_size=8", "--set", "progress=false", "--set", "tensorboard=false",
                 "--set", "device=cpu"]) == 0
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert {"PED", "PED_EXT"} <= set(preds["site"]) and preds["z_pred"].notna().all()
    rep = real["root"] / "report"
    assert main(["pediatric", "evaluate", str(out / "predictions.csv"), "--tune", str(out / "tune_predictions.csv"),
                 "--out", str(rep), "--bootstrap", "50", "--no-progress"]) == 0
    reg = json.loads((rep / "regression.json").read_text())
    assert reg["z"]["n"] == len(preds)
    # children with several images: the CIs resample children
    if preds["patient_id"].duplicated().any():
        assert reg["z"]["bootstrap"]["unit"] == "patient"
    assert (rep / "classification" / "report.html").is_file()


# --- transfer from an adult bonescreen model ----------------------------------------------


def test_init_from_an_adult_artifact_starts_the_image_branch_there(tmp_path: Path) -> None:
    """``pediatric train --init-from adult.pt``: the backbone starts from the adult model's weights (not its
    classifier), the card names the source model by its weights' sha256, another architecture is refused."""
    from _screen_helpers import make_artifact

    from bonescreen.artifact import load_artifact, weights_fingerprint
    from bonescreen.cli import build_parser
    from bonescreen.config import config_from_args
    from bonescreen.models import PretrainedLoadError
    from bonescreen.pediatric.model import FusionRegressor
    from bonescreen.training.model import resolve_pretrained

    adult = make_artifact(tmp_path / "adult.pt", "stage2", arch=ARCH, seed=3, ood=False)
    args = build_parser().parse_args(["pediatric", "train", "m.csv", "--out", "o", "--init-from", str(adult),
                                      "--set", f"arch={ARCH}"])
    cfg = config_from_args(args, {"pretrained": str(args.init_from)})
    arg, desc = resolve_pretrained(cfg)
    source = load_artifact(adult).model.state_dict()
    assert arg == str(adult)
    assert desc.startswith("bonescreen model adult.pt") and "task stage2" in desc
    assert weights_fingerprint(source)[:16] in desc
    net = FusionRegressor(ARCH, pretrained=arg)
    body = net.backbone.state_dict()
    shared = [k for k in body if k in source]
    assert len(shared) == len(body) > 10  # every backbone tensor came from the adult model ...
    assert all(torch.equal(body[k], source[k]) for k in shared)
    assert not any(k.startswith("fc.") for k in body)  # ... and its classifier was left behind
    with pytest.raises(PretrainedLoadError, match="architecture 'resnet10t'.*trains 'resnet18'"):
        resolve_pretrained(config_from_args(args, {"pretrained": str(adult), "arch": "resnet18"}))


def test_folds_ensemble_fits_spread_out_of_fold_and_screens_as_one_model(
        run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pediatric train --folds K``: K members, each trained without one fold of the training children,
    predict that fold; the Z source and stretch are fitted on those out-of-fold pairs; the artifact is
    the members' mean and predicts like any pediatric model (SHAP's split of it is exact)."""
    import bonescreen.training.pediatric as tp
    from bonescreen.artifact import load_artifact
    from bonescreen.config import ConfigError, load_config
    from bonescreen.pediatric import predict_pediatric
    from bonescreen.pediatric.model import FusionEnsemble
    from bonescreen.training.crossfit import train_pediatric_ensemble

    cfg = load_config("pediatric-cpu-tiny", {
        "arch": ARCH, "pretrained": None, "image_size": 48, "epochs": 2, "batch_size": 8,
        "progress": False, "tensorboard": False, "device": "cpu",
    })
    with pytest.raises(ConfigError, match="at least 2 folds"):
        train_pediatric_ensemble(run["manifest"], tmp_path / "bad", cfg, cache_root=run["cache"], folds=1)
    with pytest.raises(TableError, match="at least 50 training children"):
        train_pediatric_ensemble(run["manifest"], tmp_path / "bad", cfg, cache_root=run["cache"], folds=10)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(z_true: np.ndarray, z_pred: np.ndarray, n_boot: int = 0) -> dict[str, Any]:
        # a 2-epoch model at 48 px need not correlate with Z: record the pairs, return a known stretch
        seen.append((np.asarray(z_true, float), np.asarray(z_pred, float)))
        return {"method": "moment_match", "a": 0.25, "b": 1.5, "n": len(z_true), "r": 0.5, "sd_true": 1.5,
                "sd_pred": 1.0, "b_ci95": [1.4, 1.6]}

    monkeypatch.setattr(tp, "fit_spread", spy)
    res = train_pediatric_ensemble(run["manifest"], tmp_path / "cf", cfg, cache_root=run["cache"], folds=2)
    manifest = pd.read_csv(run["manifest"], dtype={"patient_id": str, "image_id": str})
    train = manifest[(manifest["split"] == "train") & manifest["z_lumbar_spine"].notna()]
    members = tmp_path / "cf" / "members"
    held = [pd.read_csv(members / f"fold{k}" / "predictions.csv", dtype={"patient_id": str, "image_id": str})
            for k in (0, 1)]
    assert held[0].size and held[1].size and not set(held[0]["patient_id"]) & set(held[1]["patient_id"])
    assert sorted(pd.concat(held)["image_id"]) == sorted(train["image_id"])  # each training pair held out once
    assert not (members / "fold0" / "model.pt").exists()  # the ensemble's artifact holds the weights
    oof = pd.read_csv(tmp_path / "cf" / "oof_predictions.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(train["image_id"])
    # the artifact's stretch was fitted on the out-of-fold pairs (the last fit; earlier ones score epochs)
    np.testing.assert_allclose(seen[-1][0], oof["z_true"].to_numpy(float))
    assert len(seen[-1][1]) == len(train) > len(pd.read_csv(tmp_path / "cf" / "tune_predictions.csv"))
    loaded = load_artifact(res.artifact_path, expected_task="pediatric")
    net = loaded.model
    assert isinstance(net, FusionEnsemble) and len(net.members) == 2
    extra = loaded.spec.extra
    assert extra["ensemble"]["members"] == 2
    assert extra["z_spread"]["fitted_on"].startswith("out-of-fold") and extra["z_spread"]["b"] == 1.5
    card = json.loads((tmp_path / "cf" / "model_card.json").read_text())
    assert card["model_selection"].startswith("each member's epoch: the last epoch")
    assert card["ensemble"]["fold_best_epochs"] == [2, 2]  # members keep their last epoch, not the tuning pick
    # one model to every caller: the mean of the members; SHAP's embedding/fuse split gives the same output
    m0, m1 = net.members
    assert not torch.equal(m0.head[-1].weight, m1.head[-1].weight)
    x, c = torch.rand(3, 1, loaded.size, loaded.size), torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c), (m0(x, c) + m1(x, c)) / 2)
        torch.testing.assert_close(net.fuse(net.image_embedding(x), c), net(x, c))
    imgs = np.random.default_rng(0).integers(0, 256, (2, loaded.size, loaded.size), dtype=np.uint8)
    clin = pd.DataFrame({"age": [5.0, 12.0], "sex": ["F", "M"], "height_cm": [110, 150], "weight_kg": [18, 40]})
    out = predict_pediatric(loaded, imgs, clin)
    assert out["pred_z"].notna().all() and out["reason"].tolist() == ["", ""]
    assert loaded.spec.ood and loaded.features(imgs).shape[0] == 2  # the OOD check reads the first member
    # explanation: SHAP of the mean is exact (base + sum = reported Z); Grad-CAM through the first member
    from bonescreen.pediatric.explain import clinical_shap, gradcam_low_bmd

    raw = np.array([[5.0, 1.0, 110.0, 18.0], [12.0, 0.0, 150.0, 40.0]])
    bg = np.column_stack([np.linspace(2, 17, 12), np.ones(12), np.linspace(90, 180, 12), np.linspace(12, 70, 12)])
    sh = clinical_shap(loaded, imgs, raw, bg)
    np.testing.assert_allclose(sh.base + sh.values.sum(axis=1), loaded.predict_pediatric(imgs, raw)["z"], atol=1e-4)
    assert gradcam_low_bmd(loaded, imgs, raw).shape == (2, loaded.size, loaded.size)


def test_train_cli_folds_flag_and_refusals(tmp_path: Path) -> None:
    """``pediatric train --folds K [--refit N]`` reaches the ensemble trainer; --resume cannot continue K
    members; --refit without --folds has no out-of-fold fit to carry over."""
    from bonescreen.cli import build_parser, main

    args = build_parser().parse_args(["pediatric", "train", "m.csv", "--out", "o", "--folds", "3", "--refit", "2"])
    assert args.folds == 3 and args.refit == 2 and args.z_spread == "match"
    assert build_parser().parse_args(["pediatric", "train", "m.csv", "--out", "o"]).folds == 1
    # refused before any data is read
    for extra in (["--folds", "3", "--resume"], ["--refit", "2"], ["--folds", "3", "--refit", "-1"]):
        assert main(["pediatric", "train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), *extra]) != 0
    assert not (tmp_path / "o").exists()


def test_refit_screens_with_full_data_members_and_the_out_of_fold_spread(
        run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--folds 2 --refit 2``: the fold members only fit the stretch (on their out-of-fold pairs); the
    artifact is the mean of 2 members trained on the whole training split with seeds seed and seed+1."""
    import bonescreen.training.pediatric as tp
    from bonescreen.artifact import load_artifact
    from bonescreen.config import load_config
    from bonescreen.pediatric.model import FusionEnsemble
    from bonescreen.training.crossfit import train_pediatric_ensemble

    cfg = load_config("pediatric-cpu-tiny", {
        "arch": ARCH, "pretrained": None, "image_size": 48, "epochs": 1, "batch_size": 8,
        "progress": False, "tensorboard": False, "device": "cpu", "seed": 7,
    })
    seen: list[np.ndarray] = []

    def spy(z_true: np.ndarray, z_pred: np.ndarray, n_boot: int = 0) -> dict[str, Any]:
        seen.append(np.asarray(z_true, float))
        return {"method": "moment_match", "a": 0.0, "b": 1.25, "n": len(z_true), "r": 0.5, "sd_true": 1.25,
                "sd_pred": 1.0, "b_ci95": [1.2, 1.3]}

    monkeypatch.setattr(tp, "fit_spread", spy)
    res = train_pediatric_ensemble(run["manifest"], tmp_path / "rf", cfg, cache_root=run["cache"], folds=2, refit=2)
    manifest = pd.read_csv(run["manifest"], dtype={"patient_id": str, "image_id": str})
    train = manifest[(manifest["split"] == "train") & manifest["z_lumbar_spine"].notna()]
    members = tmp_path / "rf" / "members"
    for i, seed in ((0, 7), (1, 8)):  # each full-data member saw every training pair, with its own seed
        card = json.loads((members / f"full{i}" / "model_card.json").read_text())
        assert card["config"]["seed"] == seed and card["training_data"]["train"]["n"] == len(train)
        assert not (members / f"full{i}" / "model.pt").exists()
    oof = pd.read_csv(tmp_path / "rf" / "oof_predictions.csv", dtype={"image_id": str})
    assert sorted(oof["image_id"]) == sorted(train["image_id"])
    np.testing.assert_allclose(seen[-1], oof["z_true"].to_numpy(float))  # the artifact's stretch: out of fold
    loaded = load_artifact(res.artifact_path, expected_task="pediatric")
    assert isinstance(loaded.model, FusionEnsemble) and len(loaded.model.members) == 2
    extra = loaded.spec.extra
    assert extra["ensemble"]["members"] == 2 and "all" in extra["ensemble"]["how"]
    assert extra["z_spread"]["b"] == 1.25 and "2 folds, carried over to 2 full-data" in extra["z_spread"]["fitted_on"]
    assert set(pd.read_csv(members / "metrics.csv")["member"]) == {"fold0", "fold1", "full0", "full1"}
    # --refit 1: one network, no ensemble wrapper, the stretch still out of fold
    one = train_pediatric_ensemble(run["manifest"], tmp_path / "r1", cfg, cache_root=run["cache"], folds=2, refit=1)
    single = load_artifact(one.artifact_path, expected_task="pediatric")
    assert not isinstance(single.model, FusionEnsemble) and "ensemble" not in single.spec.extra
    assert single.spec.extra["z_spread"]["fitted_on"].startswith("out-of-fold")


def test_folds_ensemble_without_a_tuning_split_fits_the_spread_out_of_fold(
        run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tuning split: members keep their last epoch as always, and the stretch and residual SD still
    come from the out-of-fold pairs (a single model would get none)."""
    import bonescreen.training.pediatric as tp
    from bonescreen.artifact import load_artifact
    from bonescreen.config import load_config
    from bonescreen.training.crossfit import train_pediatric_ensemble

    manifest = pd.read_csv(run["manifest"], dtype={"patient_id": str, "image_id": str})
    manifest.loc[manifest["split"] == "tune", "split"] = "train"
    cfg = load_config("pediatric-cpu-tiny", {
        "arch": ARCH, "pretrained": None, "image_size": 48, "epochs": 1, "batch_size": 8,
        "progress": False, "tensorboard": False, "device": "cpu",
    })
    monkeypatch.setattr(tp, "fit_spread", lambda t, p, n_boot=0: {
        "method": "moment_match", "a": 0.0, "b": 2.0, "n": len(t), "r": 0.5, "sd_true": 2.0, "sd_pred": 1.0,
        "b_ci95": [1.9, 2.1]})
    res = train_pediatric_ensemble(manifest, tmp_path / "cf", cfg, cache_root=run["cache"], folds=2)
    extra = load_artifact(res.artifact_path).spec.extra
    n_train = int(((manifest["split"] == "train") & manifest["z_lumbar_spine"].notna()).sum())
    assert extra["z_spread"]["n"] == n_train and extra["z_spread"]["fitted_on"].startswith("out-of-fold")
    assert extra["residual_sd_z"] > 0 and res.tune_predictions_path is None
    assert not (tmp_path / "cf" / "tune_predictions.csv").exists()
