"""Small learnable image cohorts for the training-stack tests.

The label is a visible texture (1: horizontal stripes, 0: vertical stripes,
under noise and random contrast), so a tiny CNN can learn it in a few steps,
and a horizontal flip does not change the class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def stripe_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(5, 9)
    phase = rng.uniform(0, 2 * np.pi)
    coord = yy if label == 1 else xx
    stripes = np.sin(2 * np.pi * coord / period + phase)
    img = 120 + 60 * rng.uniform(0.5, 1.0) * stripes + rng.normal(0, 25, (size, size))
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
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for split, n in n_per_split.items():
        for i in range(n):
            label = i % 2
            path = img_dir / f"img{k:04d}.png"
            Image.fromarray(stripe_image(label, size, rng)).save(path)
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
