"""Helpers for the screening tests: tiny random-weight artifacts, fake models, synthetic radiographs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def make_artifact(path: Path, task: str = "stage2", *, arch: str = "convnext_atto", size: int = 64,
                  seed: int = 0, **spec_kwargs: Any) -> Path:
    """A loadable artifact with seeded random weights (no training needed)."""
    import torch

    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.models import create_model

    torch.manual_seed(seed)
    spec = ModelSpec.for_task(arch, task, **spec_kwargs)
    spec.preprocess["size"] = size
    model = create_model(arch, spec.num_classes)
    return save_artifact(path, model, spec)


def radiograph(seed: int = 0, shape: tuple[int, int] = (256, 256), levels: int = 4000) -> np.ndarray:
    """A smooth synthetic 12-bit image with plenty of grey levels (passes the sanity gate)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 + 0.3 * np.sin(6 * x + seed) * np.cos(4 * y) + 0.05 * rng.standard_normal(shape)
    return np.clip(img * levels, 0, 4095).astype(np.uint16)


@dataclass
class FakeSpec:
    task: str
    class_names: list[str]
    positive_class: int = 1
    threshold: float = 0.5
    num_classes: int = 2
    arch: str = "fake"
    eligibility: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=lambda: {"size": 8})


class FakeModel:
    """Probabilities from the image mean: p(positive) = mean / 255; records what it was shown."""

    def __init__(self, task: str = "stage2", size: int = 8) -> None:
        from bonescreen.artifact import TASK_CLASSES

        names = TASK_CLASSES[task]
        self.spec = FakeSpec(task, list(names), num_classes=len(names), preprocess={"size": size})
        self.path = Path(f"{task}.fake")
        self.calls: list[np.ndarray] = []

    @property
    def size(self) -> int:
        return int(self.spec.preprocess["size"])

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64)
        self.calls.append(x.reshape(len(x), -1).mean(axis=1))
        m = x.reshape(len(x), -1).mean(axis=1) / 255.0
        if self.spec.num_classes == 2:
            return np.stack([1 - m, m], axis=1)
        # three-class: the mean picks the class (low: normal, middle: low bone mass, high: osteoporosis)
        logits = np.stack([-(m - 0.1) ** 2, -(m - 0.5) ** 2, -(m - 0.9) ** 2], axis=1) * 50
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
