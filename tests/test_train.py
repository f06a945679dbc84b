"""``bonescreen train``: learning, outputs, model selection, artifact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _train_helpers import make_cohort, tiny_config, trained_teacher

from bonescreen.artifact import load_artifact
from bonescreen.errors import TableError
from bonescreen.schema import PREDICTION_OPTIONAL, PREDICTION_REQUIRED
from bonescreen.training.inference import predict_manifest
from bonescreen.training.jobs import train_model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):  # type: ignore[no-untyped-def]
    return trained_teacher(tmp_path_factory)


def test_loss_falls_and_auc_beats_chance(teacher) -> None:  # type: ignore[no-untyped-def]
    r = teacher["result"]
    hist = r.history
    assert len(hist) == 3 and r.stopped == "completed"
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert max(h["tune_auc"] for h in hist) > 0.8
    assert r.model_card["test_metrics"]["auc"] > 0.8
    metrics = pd.read_csv(r.metrics_csv)
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert {"train_loss", "tune_loss", "tune_auc", "lr", "images_per_s"} <= set(metrics.columns)
    assert any((r.out_dir / "tensorboard").iterdir())


def test_best_tuning_epoch_is_the_saved_model(teacher) -> None:  # type: ignore[no-untyped-def]
    r = teacher["result"]
    best = max(r.history, key=lambda h: h["tune_auc"])
    assert r.best_epoch == best["epoch"]
    loaded = load_artifact(r.artifact_path)
    card = loaded.spec.model_card
    assert card["best_epoch"] == best["epoch"]
    # training ends by fitting the OOD part on the train split (threshold on tune) for these weights
    from bonescreen.ood import OODModel

    from bonescreen.artifact import FORMAT_VERSION

    assert loaded.format_version == FORMAT_VERSION and loaded.spec.ood is not None
    ood = OODModel.from_dict(loaded.spec.ood)
    assert ood.weights_fingerprint == loaded.fingerprint and ood.n_fit == 48 and ood.n_tune == 24
    assert ood.threshold > 0 and ood.quantile == pytest.approx(0.995)
    assert card["tune_metrics"]["tune_auc"] == pytest.approx(best["tune_auc"])
    train = card["training_data"]["train"]
    assert train["n"] == 48 and train["per_class"] == {"normal": 24, "low_bone_mass": 24}
    assert set(train["per_site"]) == {"A", "B"}
    assert card["preset"] == "cpu-tiny" and card["arch"] == "test_convnext"


def test_predictions_table_and_artifact_give_identical_scores(teacher) -> None:  # type: ignore[no-untyped-def]
    r = teacher["result"]
    preds = pd.read_csv(r.predictions_path, dtype={"image_id": str})
    assert set(PREDICTION_REQUIRED) <= set(preds.columns)
    assert set(preds.columns) <= set(PREDICTION_REQUIRED) | set(PREDICTION_OPTIONAL)
    assert len(preds) == 24 and set(preds["split"]) == {"test"} and set(preds["model"]) == {"teacher"}
    assert preds["score"].between(0, 1).all()

    again = predict_manifest(r.artifact_path, teacher["manifest"], teacher["cache"], split="test", progress=False)
    assert again["image_id"].tolist() == preds["image_id"].tolist()
    np.testing.assert_allclose(again["score"].to_numpy(), preds["score"].to_numpy(), atol=1e-6)

    loaded = load_artifact(r.artifact_path)
    from bonescreen.preprocess import PreprocessCache

    frame = pd.read_csv(teacher["manifest"])
    test_paths = frame.loc[frame["split"] == "test", "path"].tolist()[:5]
    imgs = np.stack([PreprocessCache(teacher["cache"], 48).get(p) for p in test_paths])
    np.testing.assert_allclose(loaded.score(imgs), preds["score"].to_numpy()[:5], atol=1e-6)


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    """Stop mid-epoch after 4 steps, resume, and end with the uninterrupted run's weights."""
    manifest = make_cohort(tmp_path / "data", {"train": 48, "tune": 8, "test": 0}, size=32)
    cache = tmp_path / "cache"
    cfg = {"image_size": 32, "epochs": 2, "tensorboard": False, "augment": "strong", "drop_path_rate": 0.1}
    straight = train_model(manifest, tmp_path / "a", tiny_config(**cfg), cache_root=cache)
    assert straight.global_step == 6

    stopped = train_model(manifest, tmp_path / "b", tiny_config(**cfg, max_steps=4), cache_root=cache)
    assert stopped.stopped == "max_steps" and stopped.global_step == 4
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 1, 4)

    resumed = train_model(manifest, tmp_path / "b", tiny_config(**cfg), cache_root=cache, resume=True)
    assert resumed.global_step == 6 and resumed.stopped == "completed"
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    from bonescreen.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        train_model(manifest, tmp_path / "b", tiny_config(**cfg, batch_size=8), cache_root=cache, resume=True)


def test_three_class_and_class_balance(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data", {"train": 30, "tune": 12, "test": 9}, size=32)
    frame = pd.read_csv(manifest)
    frame["label_3class"] = np.arange(len(frame)) % 3
    frame.to_csv(manifest, index=False)
    r = train_model(
        manifest,
        tmp_path / "out",
        tiny_config(image_size=32, epochs=1, balance="sampler", tensorboard=False),
        cache_root=tmp_path / "cache",
        task="three_class",
    )
    preds = pd.read_csv(r.predictions_path)
    assert {"prob_normal", "prob_low_bone_mass", "prob_osteoporosis", "label_3class"} <= set(preds.columns)
    np.testing.assert_allclose(preds["score"], 1 - preds["prob_normal"], atol=1e-6)
    assert load_artifact(r.artifact_path).spec.num_classes == 3


def test_unreadable_images_are_skipped_and_bad_manifests_fail(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data", {"train": 20, "tune": 6, "test": 0}, size=32)
    frame = pd.read_csv(manifest)
    Path(frame.loc[0, "path"]).write_bytes(b"corrupt")
    r = train_model(
        manifest, tmp_path / "out", tiny_config(image_size=32, epochs=1, tensorboard=False), cache_root=tmp_path / "c"
    )
    assert r.n_skipped_images == 1
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped.loc[0, "path"] == frame.loc[0, "path"] and skipped.loc[0, "reason"]
    assert r.model_card["training_data"]["train"]["n"] == 19

    one_class = frame.assign(label=0)
    with pytest.raises(TableError, match="single class"):
        train_model(one_class, tmp_path / "x", tiny_config(image_size=32), cache_root=tmp_path / "c")
    with pytest.raises(TableError, match="no labelled 'train'"):
        train_model(frame.assign(split="test"), tmp_path / "x", tiny_config(image_size=32), cache_root=tmp_path / "c")


def test_cli_train_writes_the_outputs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.cli import main

    manifest = make_cohort(tmp_path / "data", {"train": 16, "tune": 8, "test": 8}, size=32)
    rc = main(
        [
            "train", str(manifest), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
            "--arch", "test_convnext", "--pretrained", "none", "--epochs", "1", "--image-size", "32",
            "--batch-size", "8", "--no-progress", "--set", "tensorboard=false", "--set", "lr=0.003",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "model:" in out and "predictions:" in out
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["config"]["lr"] == 0.003 and card["pretrained"] == "random init"
    rc = main(["train", str(manifest), "--out", str(tmp_path / "o2"), "--set", "no_such_key=1"])
    assert rc == 1
    assert "unknown config key" in capsys.readouterr().err


def test_task_registry_and_selection_fallbacks() -> None:
    """Each task name maps to its hooks and entry point; the evaluations' fallbacks score as documented."""
    from bonescreen.distributed import DistEnv
    from bonescreen.training.jobs import ClassifierHooks
    from bonescreen.training.pediatric import PediatricHooks
    from bonescreen.tasks import UnknownTaskError
    from bonescreen.training.registry import TASK_TRAINING, train
    from bonescreen.training.selection import CallbackEvaluation, ClassifierEvaluation, TrainLossSelection

    assert set(TASK_TRAINING) == {"stage1", "stage2", "three_class", "pediatric"}
    assert TASK_TRAINING["pediatric"].hooks is PediatricHooks and TASK_TRAINING["stage1"].hooks is ClassifierHooks
    with pytest.raises(UnknownTaskError, match="unknown task .nope."):
        train("nope", "m.csv", "out")
    cfg, env, model = tiny_config(), DistEnv(), torch.nn.Identity()
    assert TrainLossSelection().epoch(model, env, cfg, False, 0.25).score == -0.25
    # a classifier job without tuning images falls back to the training loss, and has no test step
    empty = ClassifierEvaluation("stage2", None, None, pd.DataFrame())
    assert empty.epoch(model, env, cfg, False, 0.5).score == -0.5
    assert empty.test(model, env, cfg, False, "m") == (None, None)
    nan = CallbackEvaluation(lambda m, e: ({"tune_x": np.float64(1.0)}, float("nan"))).epoch(model, env, cfg, False, 0.1)
    assert nan.score == -np.inf and type(nan.metrics["tune_x"]) is float  # plain Python for the checkpoint
