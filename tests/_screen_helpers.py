"""Helpers for the screening tests: tiny random-weight artifacts, fake models, synthetic radiographs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def make_artifact(path: Path, task: str = "stage2", *, arch: str = "convnext_atto", size: int = 64,
                  seed: int = 0, ood: bool = True, **spec_kwargs: Any) -> Path:
    """A loadable v2 artifact with seeded random weights (no training needed).

    ``ood``: an OOD part fitted on :func:`ood_images` (half to fit, half for the threshold),
    as ``train`` would fit one on its training split; False leaves it out (the opt-out tests).
    """
    import torch

    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.models import create_model

    torch.manual_seed(seed)
    spec = ModelSpec.for_task(arch, task, **spec_kwargs)
    spec.preprocess["size"] = size
    model = create_model(arch, spec.num_classes)
    save_artifact(path, model, spec)
    if ood:
        from bonescreen.ood import attach_ood

        from _service_support import widen_ood_threshold

        imgs = ood_images(size)
        attach_ood(path, imgs[::2], None, imgs[1::2])
        widen_ood_threshold(Path(path), 1.5)  # see its docstring: test fixtures only
    return Path(path)


def radiograph(seed: int = 0, shape: tuple[int, int] = (256, 256), levels: int = 4000) -> np.ndarray:
    """A smooth synthetic 12-bit 'frontal chest' with plenty of grey levels (passes the sanity gate):
    a bright body and mediastinum, two darker lung fields, and a seeded texture."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    y = y * max(h, w) / h
    x = x * max(h, w) / w
    lungs = np.exp(-(((x - 0.3) / 0.13) ** 2 + ((y - 0.5) / 0.25) ** 2)) + \
        np.exp(-(((x - 0.7) / 0.13) ** 2 + ((y - 0.5) / 0.25) ** 2))
    texture = 0.1 * np.sin(6 * x + seed) * np.cos(4 * y)
    img = 0.75 - 0.4 * lungs + texture + 0.04 * rng.standard_normal(shape)
    return np.clip(img * levels, 0, 4095).astype(np.uint16)


@dataclass
class Meta:
    """The ImageMeta fields the gate reads (a frontal adult CR by default)."""

    modality: str | None = "CR"
    view: str | None = "PA"
    age: float | None = 63.0
    rows: int | None = 2000
    columns: int | None = 2000
    body_part: str | None = None
    anatomic_region_code: str | None = None
    anatomic_region_meaning: str | None = None
    protocol_name: str | None = None
    series_description: str | None = None
    study_description: str | None = None


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


def ood_images(size: int, n: int = 48, seed: int = 1000) -> np.ndarray:
    """Preprocessed :func:`radiograph` images the test artifacts' OOD parts are fitted on (the
    test images are of the same kind, so they are in distribution for those OOD parts)."""
    from bonescreen.preprocess import preprocess_array

    return np.stack([preprocess_array(radiograph(seed + i).astype(np.float32), size) for i in range(n)])
