"""Multi-process training: ``torchrun --nproc_per_node 2`` on the gloo (CPU) backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from _train_helpers import make_cohort


def test_two_process_gloo_training_ranks_agree(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data", {"train": 32, "tune": 12, "test": 10}, size=32)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bonescreen", "train", str(manifest), "--out", str(out), "--cache", str(tmp_path / "cache"),
        "--arch", "test_convnext", "--pretrained", "none", "--epochs", "2", "--image-size", "32",
        "--batch-size", "16", "--device", "cpu", "--no-progress",
        "--set", "tensorboard=false", "--set", "lr=0.003", "--set", "augment=strong",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    check = json.loads((out / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["agree"] is True
    assert len(check["checksums"]) == 2 and check["checksums"][0] == check["checksums"][1]
    # Global batch 16 = 2 x 8: 32 images give 2 steps per epoch.
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["global_step"] == 4
    # Rank 0 alone writes the outputs; the tuning AUC is computed on all 12 images gathered.
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 2 and metrics["tune_auc"].notna().all()
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 10 and preds["image_id"].is_unique
    assert proc.stdout.count("model:") == 1
