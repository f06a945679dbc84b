"""``bonescreen pseudolabel``: thresholds on known scores, and an end-to-end pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _train_helpers import blob_image, trained_teacher

from bonescreen.pseudolabel import pseudolabel, select_proxy_labels


def test_thresholds_on_known_scores() -> None:
    p_low = np.array([0.001, 0.0100, 0.0101, 0.30, 0.5, 0.7499, 0.75, 0.9, 1.0])
    probs = np.stack([1 - p_low, p_low], axis=1)
    cls, keep = select_proxy_labels(probs, (0.99, 0.75))
    assert cls.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    # normal kept when P(normal) >= 0.99, i.e. P(low) <= 0.01; low bone mass when P(low) >= 0.75
    assert keep.tolist() == [True, True, False, False, False, False, True, True, True]
    # The paper's alternatives for the low-bone-mass threshold (Table S3).
    for th, n_low in [(0.65, 4), (0.75, 3), (0.85, 2)]:
        c, k = select_proxy_labels(probs, (0.99, th))
        assert int(((c == 1) & k).sum()) == n_low


def test_three_class_thresholds_and_bad_input() -> None:
    probs = np.array([[0.995, 0.004, 0.001], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.05, 0.05, 0.9]])
    cls, keep = select_proxy_labels(probs, (0.99, 0.75, 0.85))
    assert cls.tolist() == [0, 1, 2, 2] and keep.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="thresholds"):
        select_proxy_labels(probs, (0.99, 0.75))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select_proxy_labels(probs[:, :2], (1.5, 0.75))


def test_pool_folder_end_to_end(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    t = trained_teacher(tmp_path_factory)
    pool = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(11)
    for i in range(12):
        Image.fromarray(blob_image(i % 2, 48, rng)).save(pool / f"p{i:02d}.png")
    (pool / "sub").mkdir()
    (pool / "sub" / "broken.png").write_bytes(b"nope")
    (pool / "notes.txt").write_text("not an image")
    out = pool.parent / "proxy" / "proxy.csv"
    # Thresholds below the paper's: a teacher trained for 3 epochs on 48 images is not that sure.
    res = pseudolabel(t["result"].artifact_path, pool, out, thresholds=(0.6, 0.65), cache_root=t["cache"], progress=False)

    c = res.counts
    assert c["n_pool"] == 13 and c["n_scored"] == 12 and c["n_unreadable"] == 1
    assert sum(v["kept"] + v["excluded"] for v in c["classes"].values()) == 12
    assert json.loads(res.counts_json.read_text()) == c
    scores = pd.read_csv(res.scores_csv)
    kept = pd.read_csv(out)
    # Counts and files agree with the rule applied to the written probabilities.
    rule_low = scores["prob_low_bone_mass"] >= 0.65
    rule_norm = scores["prob_normal"] >= 0.6
    assert len(kept) == int((rule_low | rule_norm).sum()) == c["n_kept"]
    assert c["classes"]["low_bone_mass"]["kept"] == int(rule_low.sum())
    assert set(kept["label"]) <= {0, 1} and (kept["split"] == "train").all() and (kept["proxy"] == 1).all()
    assert (kept["label"] == (kept["prob_low_bone_mass"] > 0.5)).all()
    # The teacher learnt the blob: the truth (i % 2) agrees with most kept proxy labels.
    truth = kept["path"].map(lambda p: int(Path(p).stem[1:]) % 2)
    assert (truth == kept["label"]).mean() > 0.7 and len(kept) >= 4


def test_cli_pseudolabel(tmp_path_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    from bonescreen.cli import main

    t = trained_teacher(tmp_path_factory)
    manifest = pd.read_csv(t["manifest"])
    pool_csv = tmp_path_factory.mktemp("poolcsv") / "pool.csv"
    manifest[["image_id", "path"]].head(10).to_csv(pool_csv, index=False)
    out = pool_csv.parent / "proxy.csv"
    rc = main(
        ["pseudolabel", "--model", str(t["result"].artifact_path), "--pool", str(pool_csv), "--out", str(out),
         "--cache", str(t["cache"]), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "low_bone_mass" in text and "kept" in text
    counts = json.loads((pool_csv.parent / "proxy.counts.json").read_text())
    assert counts["thresholds"] == {"normal": 0.99, "low_bone_mass": 0.75} and counts["n_pool"] == 10
