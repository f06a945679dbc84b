"""Small learnable image cohorts for the training-stack tests.

The label is visible (a bright blob in the upper or lower half, under noise),
so a tiny CNN learns it in a few steps, and a horizontal flip does not change
the class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def blob_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A bright blob in the upper (label 1) or lower (label 0) half, under noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size * (0.3 if label else 0.7) + rng.normal(0, size * 0.05)
    cx = size * 0.5 + rng.normal(0, size * 0.15)
    r = size * 0.15
    img = 100 + 80 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.normal(0, 20, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_cohort(
    root: Path,
    n_per_split: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
    sites: tuple[str, ...] = ("A", "B"),
) -> Path:
    """PNG files + a manifest CSV (schema columns that training reads); returns the CSV path."""
    n_per_split = n_per_split or {"train": 48, "tune": 24, "test": 24}
    rng = np.random.default_rng(seed)
    img_dir = (root / "images").resolve()
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for split, n in n_per_split.items():
        for i in range(n):
            label = i % 2
            path = img_dir / f"img{k:04d}.png"
            Image.fromarray(blob_image(label, size, rng)).save(path)
            rows.append(
                {
                    "image_id": f"img{k:04d}",
                    "path": str(path),
                    "patient_id": f"P{k:04d}",
                    "site": sites[k % len(sites)],
                    "sex": "F" if k % 3 else "M",
                    "age": 50 + k % 40,
                    "t_min": -1.8 if label else 0.2,
                    "category": "low_bone_mass" if label else "normal",
                    "severity": "moderate" if label else "normal",
                    "label": label,
                    "label_stage1": 0,
                    "label_3class": label,
                    "split": split,
                }
            )
            k += 1
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_config(**overrides):  # type: ignore[no-untyped-def]
    """cpu-tiny with a ~0.2 M-parameter timm test network at 48 px: seconds per run."""
    from bonescreen.config import load_config

    values = {
        "arch": "test_convnext",
        "pretrained": None,
        "image_size": 48,
        "batch_size": 16,
        "epochs": 3,
        "lr": 3e-3,
        "warmup_epochs": 0,
        "progress": False,
        "tensorboard": True,
        "device": "cpu",
        # One thread: on a shared 2-core runner, two OpenMP threads per
        # process spin against each other and a step takes 10x longer.
        "num_threads": 1,
    }
    values.update(overrides)
    return load_config("cpu-tiny", values)


_TEACHER: dict[str, object] = {}


def trained_teacher(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One small cohort and a teacher trained on it, shared by the test modules of a session."""
    if "result" not in _TEACHER:
        from bonescreen.training.jobs import train_model

        root = tmp_path_factory.mktemp("teacher")
        manifest = make_cohort(root / "data")
        cache = root / "cache"
        result = train_model(manifest, root / "out", tiny_config(), cache_root=cache)
        _TEACHER.update(result=result, manifest=manifest, cache=cache, root=root)
    return _TEACHER
