"""Knowledge distillation: the loss by hand, and a student run end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _train_helpers import tiny_config, trained_teacher

from bonescreen.artifact import load_artifact
from bonescreen.training.distill import distill, distillation_loss


def test_loss_matches_a_hand_computed_value() -> None:
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    alpha, T = 0.3, 2.0

    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ce = (-math.log(softmax([2, 0])[0]) - math.log(softmax([0, 1])[0])) / 2
    kl = 0.0
    for si, ti in (([2, 0], [1, 1]), ([0, 1], [0, 3])):
        ps, pt = softmax([x / T for x in si]), softmax([x / T for x in ti])
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = (1 - alpha) * ce + alpha * T * T * kl / 2
    got = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha=0 is plain cross-entropy; identical logits make the KL term vanish.
    assert distillation_loss(s, t, y, alpha=0.0).item() == pytest.approx(ce, rel=1e-6)
    assert distillation_loss(s, s, y, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_agrees_with_timm_logit_distillation() -> None:
    """Same input for both nets: our loss equals timm's LogitDistillationTask (complementary mode)."""
    import timm
    from timm.task import LogitDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("test_convnext", num_classes=2, in_chans=1)
    teacher = timm.create_model("test_convnext", num_classes=2, in_chans=1).eval()
    task = LogitDistillationTask(
        student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.6, temperature=3.0, verbose=False
    )
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([0, 1, 1, 0])
    ref = task(x, y)["loss"]
    with torch.no_grad():
        t_logits = teacher(x)
    ours = distillation_loss(student(x), t_logits, y, alpha=0.4, temperature=3.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_student_on_labelled_plus_proxy_data(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.pseudolabel import pseudolabel

    t = trained_teacher(tmp_path_factory)
    manifest = pd.read_csv(t["manifest"])
    root = tmp_path_factory.mktemp("student")
    pool = manifest.loc[manifest["split"] == "test", ["image_id", "path"]].assign(image_id=lambda d: "pool-" + d["image_id"])
    proxy = pseudolabel(t["result"].artifact_path, pool, root / "proxy.csv", thresholds=(0.6, 0.6),
                        cache_root=t["cache"], progress=False)
    assert proxy.n_kept > 0
    r = distill(
        t["manifest"], root / "out", tiny_config(epochs=2, strong_p=0.5), teacher=t["result"].artifact_path,
        cache_root=t["cache"], proxy=proxy.out_csv,
    )
    loaded = load_artifact(r.artifact_path)
    card = loaded.spec.model_card
    assert loaded.spec.ood and loaded.spec.ood["weights_fingerprint"] == loaded.fingerprint  # fitted at the end
    assert card["kind"] == "distilled"
    assert card["training_data"]["train"]["n"] == 48 + proxy.n_kept
    assert card["training_data"]["train"]["n_proxy"] == proxy.n_kept
    assert card["distillation"] == {
        "alpha": 0.5, "temperature": 2.0, "student_augment": "strong", "teacher_view": "weak (flip only), precomputed"
    }
    assert card["teacher"]["train_agreement"] > 0.8
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] or r.best_metrics["tune_auc"] > 0.8
    preds = pd.read_csv(r.predictions_path)
    assert set(preds["model"]) == {"student"} and len(preds) == 24


def test_teacher_soft_targets_are_the_teacher_on_each_orientation(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.data import ImageSource
    from bonescreen.training.distill import teacher_soft_targets
    from bonescreen.distributed import DistEnv

    t = trained_teacher(tmp_path_factory)
    loaded = load_artifact(t["result"].artifact_path)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 48, 48), dtype=np.uint8)
    soft = teacher_soft_targets(loaded, ImageSource([str(i) for i in range(5)], 48, array=imgs), DistEnv(), tiny_config(), False)
    with torch.no_grad():
        plain = loaded.model(loaded.to_tensor(imgs)).numpy()
        mirror = loaded.model(loaded.to_tensor(np.ascontiguousarray(imgs[:, :, ::-1]))).numpy()
    np.testing.assert_allclose(soft[:, 0], plain, atol=1e-5)
    np.testing.assert_allclose(soft[:, 1], mirror, atol=1e-5)
