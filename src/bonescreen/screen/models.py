"""The model(s) a screening run uses, and the inference backends that run them.

A backend turns a loaded artifact into a :class:`Predictor`: something with
``spec``, ``size``, ``predict_proba(uint8 N×S×S)`` and
``predict_with_features(...) -> (probabilities, penultimate features)`` (the
features feed the out-of-distribution check). Backends are registered in one
place, :data:`BACKENDS` (:func:`register_backend`); a new engine (OpenVINO, a
GPU runtime, ...) is one function there.

:class:`ModelSet` holds the main model (stage2, three_class, stage1 or
pediatric), an optional stage-1 model for the cascade, their ids
(``<file>@<sha256 prefix>``), the torch modules Grad-CAM needs, and their
validated OOD parts (:func:`bonescreen.ood.check_ood_part`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bonescreen.errors import BonescreenError, ModelArtifactError
from bonescreen.fsio import file_sha256
from bonescreen.tasks import CASCADE, TASKS, Task, get_task

__all__ = [
    "BACKENDS",
    "BackendContext",
    "ModelSet",
    "Predictor",
    "ScreenError",
    "file_sha256",
    "model_id",
    "register_backend",
]

log = logging.getLogger(__name__)



class ScreenError(BonescreenError):
    """The run as a whole cannot proceed (bad options, output folder from another model, ...)."""

    reason = "screen_error"


class Predictor(Protocol):
    """What a backend gives the engine (LoadedModel, TorchPredictor, OnnxModel and OpenVinoModel fit this; bonescreen.screen.backends)."""

    spec: Any
    path: Any

    @property
    def size(self) -> int: ...

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]: ...


def model_id(path: str | os.PathLike[str]) -> str:
    """``<file name>@<sha256 prefix>``: names the exact weights a row came from."""
    return f"{Path(path).name}@{file_sha256(path)[:12]}"


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendContext:
    """What a backend factory may need besides the artifact."""

    path: Path
    model_id: str
    threads: int | None
    cache_dir: Path | None
    device: str = "cpu"  # cpu | cuda (already resolved: backends.resolve_device)
    compile: bool = False  # torch backends: wrap the graph in torch.compile
    # int8 backends: calibration inputs (files/folders/manifests) or preprocessed uint8 images
    calibration: Any = None


#: name -> factory(loaded LoadedModel, context) -> Predictor
BACKENDS: dict[str, Callable[[Any, BackendContext], Predictor]] = {}


def register_backend(name: str) -> Callable[[Callable[[Any, BackendContext], Predictor]],
                                            Callable[[Any, BackendContext], Predictor]]:
    def deco(fn: Callable[[Any, BackendContext], Predictor]) -> Callable[[Any, BackendContext], Predictor]:
        BACKENDS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------
# The model set
# --------------------------------------------------------------------------


def check_cascade(main: Task, stage1_task: str) -> None:
    """Refuse a cascade the tasks cannot form: the stage-1 model first, a stage-2 model after it."""
    if main.cascade_refusal:
        raise ModelArtifactError(main.cascade_refusal)
    first = TASKS.get(stage1_task)
    if first is None or first.cascade_stage != 1:
        raise ModelArtifactError(f"--stage1 must be a 'stage1' (osteoporosis) model, got a {stage1_task!r} model")
    if main.cascade_stage != 2:
        raise ModelArtifactError(
            f"the cascade runs a stage-2 model after the stage-1 model; --model is a {main.name!r} model"
        )


@dataclass
class ModelSet:
    """The model(s) a run uses: ``main`` (stage2, three_class, stage1 or pediatric) and an optional ``stage1``."""

    main: Predictor
    stage1: Predictor | None = None
    main_id: str = ""
    stage1_id: str = ""
    backend: str = "torch"
    # torch modules for Grad-CAM (None when only an ONNX file was given)
    main_torch: Any = None
    stage1_torch: Any = None
    # weight fingerprints (None: not computable, e.g. a bare ONNX file)
    main_fingerprint: str | None = None
    stage1_fingerprint: str | None = None
    # backend="auto": how the backend was chosen (bonescreen.screen.auto.Choice.as_dict), for run.json
    choice: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        task = self.main.spec.task
        if task not in TASKS:
            raise ModelArtifactError(
                f"a {task!r} model cannot screen; expected one of {', '.join(TASKS)}"
            )
        if self.stage1 is not None:
            check_cascade(TASKS[task], self.stage1.spec.task)

    @property
    def mode(self) -> str:
        if self.stage1 is not None:
            return CASCADE
        return str(self.main.spec.task)

    @property
    def task(self) -> Task:
        """The main model's task (``bonescreen.tasks``); a cascade's is the stage-2 task."""
        return get_task(self.main.spec.task)

    @property
    def pediatric(self) -> bool:
        """The main model takes clinical variables besides the image (the pediatric task)."""
        return self.task.needs_clinical

    @property
    def sizes(self) -> list[int]:
        sizes = {int(self.main.size)}
        if self.stage1 is not None:
            sizes.add(int(self.stage1.size))
        return sorted(sizes)

    def ood_parts(self) -> dict[str, Any]:
        """{"main": OODModel, "stage1": OODModel}; raises OODError when one is missing or stale."""
        from bonescreen.ood import OODError, check_ood_part

        out: dict[str, Any] = {}
        for key, pred, fp, mid in (("main", self.main, self.main_fingerprint, self.main_id),
                                   ("stage1", self.stage1, self.stage1_fingerprint, self.stage1_id)):
            if pred is None:
                continue
            name = (mid.split("@")[0] or key) if mid else key

            if fp is None and not getattr(pred.spec, "ood", None):
                raise OODError(f"{name} is an ONNX file, which carries no out-of-distribution statistics; screen "
                               "the .pt artifact with --backend onnx (same speed, OOD check kept), or pass --ood off")

            def fingerprint(fp: str | None = fp, name: str = name) -> str:
                if fp is None:
                    raise OODError(f"{name}: the weights' fingerprint cannot be computed from an ONNX file; "
                                   "screen the .pt artifact with --backend onnx, or use --ood off")
                return fp

            out[key] = check_ood_part(pred.spec, fingerprint, name)
        return out
