"""The whole recipe on a small phantom: phantom -> cohort -> teacher -> pseudo-labels -> student -> report.

Sizes are the smallest at which a tiny pretrained model learns the phantom reliably on CPU
(150 development patients at 128 px, 4 epochs: pooled test AUC 0.66-0.81 over seeds 0-2,
oracle ~0.93); the seed is fixed, so on one platform the run is deterministic.
"""

import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bonescreen.artifact import load_artifact
from bonescreen.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(n_dev=150, n_external=60, pool=60, render_size=128, seed=0, workers=1, bootstrap=200,
                     overrides={"epochs": 4})
    return run_demo(out, cfg, progress=False)


def test_teacher_learns_the_phantom(demo):
    history = pd.read_csv(demo.out_dir / "teacher" / "metrics.csv")
    losses = history["train_loss"].tolist()
    assert losses[-1] < losses[0] - 0.1  # the loss falls
    preds = pd.read_csv(demo.out_dir / "predictions" / "teacher.csv")
    test = preds[preds["split"] == "test"]
    assert len(test) > 100
    assert roc_auc_score(test["label"], test["score"]) > 0.65  # well above chance (0.5)


def test_every_stage_left_its_artifacts(demo):
    out = demo.out_dir
    counts = json.loads((out / "pseudolabel_counts.json").read_text())
    assert counts["n_pool"] == len(list((out / "phantom" / "pool" / "images").glob("*.dcm")))
    proxy = pd.read_csv(out / "pseudolabels" / "proxy.csv")
    assert set(proxy["label"]) <= {0, 1} and len(proxy) == sum(c["kept"] for c in counts["classes"].values())
    student = load_artifact(out / "student" / "model.pt", expected_task="stage2")
    assert student.spec.model_card["kind"] == "distilled"
    assert (demo.report_dir / "report.html").is_file()
    metrics = json.loads((demo.report_dir / "metrics.json").read_text())
    assert metrics  # the report was computed


def test_summary_puts_every_site_next_to_its_oracle(demo):
    s = demo.summary
    oracle = json.loads((demo.out_dir / "phantom" / "oracle.json").read_text())
    assert set(s["model"]) == {"teacher", "student"}
    assert set(s["site"]) == {"DEV", "EXT_A", "EXT_B", "EXT_C"}
    for row in s.itertuples():
        assert row.oracle_auc == pytest.approx(oracle[row.site]["auc"], abs=1e-3)
        assert 0.0 <= row.auc <= 1.0
    assert set(demo.timings) >= {"phantom", "cohort", "teacher", "pseudolabel", "student", "report"}
