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

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bonescreen.errors import BonescreenError, ModelArtifactError

__all__ = [
    "BACKENDS",
    "Bf16Predictor",
    "ModelSet",
    "Predictor",
    "ScreenError",
    "file_sha256",
    "load_models",
    "model_id",
    "register_backend",
]

log = logging.getLogger(__name__)

PEDIATRIC_CASCADE_REFUSED = (
    "a pediatric model cannot run in the two-stage cascade (--stage1 is the adult osteoporosis model, "
    "and its eligibility excludes children); screen with --model pediatric.pt alone"
)
SCREEN_TASKS = ("stage2", "three_class", "stage1", "pediatric")


class ScreenError(BonescreenError):
    """The run as a whole cannot proceed (bad options, output folder from another model, ...)."""

    reason = "screen_error"


class Predictor(Protocol):
    """What a backend gives the engine (LoadedModel, Bf16Predictor and OnnxModel fit this)."""

    spec: Any
    path: Any

    @property
    def size(self) -> int: ...

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]: ...


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


#: name -> factory(loaded LoadedModel, context) -> Predictor
BACKENDS: dict[str, Callable[[Any, BackendContext], Predictor]] = {}


def register_backend(name: str) -> Callable[[Callable[[Any, BackendContext], Predictor]],
                                            Callable[[Any, BackendContext], Predictor]]:
    def deco(fn: Callable[[Any, BackendContext], Predictor]) -> Callable[[Any, BackendContext], Predictor]:
        BACKENDS[name] = fn
        return fn

    return deco


@register_backend("torch")
def _torch_backend(loaded: Any, ctx: BackendContext) -> Predictor:
    return loaded  # type: ignore[no-any-return]


class Bf16Predictor:
    """A LoadedModel run under CPU bf16 autocast.

    The fast CPU path that keeps accuracy: on this project's AVX-512-BF16 build machine it ran
    1.8-2.0x eager fp32 for convnext_small at 512 px, and changed the demo student's AUC by
    +0.001, where onnxruntime int8 lost 0.005-0.008 (bench/bench_screen.py; README Benchmarks).
    """

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.path = loaded.path

    @property
    def size(self) -> int:
        return int(self.loaded.size)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.loaded.predict_proba(images)  # type: ignore[no-any-return]

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.loaded.predict_with_features(images)  # type: ignore[no-any-return]


@register_backend("torch-bf16")
def _bf16_backend(loaded: Any, ctx: BackendContext) -> Predictor:
    if loaded.spec.task == "pediatric":
        raise ModelArtifactError(f"{ctx.path.name} is a pediatric model: screen it with --backend torch")
    return Bf16Predictor(loaded)


@register_backend("onnx")
def _onnx_backend(loaded: Any, ctx: BackendContext) -> Predictor:
    """Export the .pt once (cached by its sha256) and run onnxruntime; the OOD part stays the .pt's."""
    from bonescreen.onnx_export import ONNX_FORMAT_VERSION, export_onnx, load_onnx, onnx_format_version

    _refuse_pediatric_onnx(loaded.spec.task, ctx.path)
    cache = ctx.cache_dir or ctx.path.parent
    onnx_path = cache / f"{ctx.path.stem}.{ctx.model_id.rsplit('@', 1)[1]}.onnx"
    if not onnx_path.is_file() or onnx_format_version(onnx_path) != str(ONNX_FORMAT_VERSION):
        log.info("exporting %s to ONNX (%s)", ctx.path.name, onnx_path)
        export_onnx(loaded, onnx_path, source_id=ctx.model_id)
    model = load_onnx(onnx_path, threads=ctx.threads)
    model.spec = loaded.spec  # the artifact's description, OOD part included
    return model


def _refuse_pediatric_onnx(task: str, path: Path) -> None:
    if task == "pediatric":
        raise ModelArtifactError(
            f"{path.name} is a pediatric model: it takes the image and the clinical variables (two inputs) "
            "and has no ONNX export; screen it with --backend torch"
        )


# --------------------------------------------------------------------------
# The model set
# --------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        task = self.main.spec.task
        if task not in SCREEN_TASKS:
            raise ModelArtifactError(
                f"a {task!r} model cannot screen; expected a stage2, three_class, stage1 or pediatric model"
            )
        if task == "pediatric" and self.stage1 is not None:
            raise ModelArtifactError(PEDIATRIC_CASCADE_REFUSED)
        if self.stage1 is not None:
            if self.stage1.spec.task != "stage1":
                raise ModelArtifactError(
                    f"--stage1 must be a 'stage1' (osteoporosis) model, got a {self.stage1.spec.task!r} model"
                )
            if task != "stage2":
                raise ModelArtifactError(
                    f"the cascade runs a stage-2 model after the stage-1 model; --model is a {task!r} model"
                )

    @property
    def mode(self) -> str:
        if self.stage1 is not None:
            return "cascade"
        return str(self.main.spec.task)

    @property
    def pediatric(self) -> bool:
        return self.main.spec.task == "pediatric"

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


def _load_one(path: str | os.PathLike[str], backend: str, threads: int | None, cache_dir: Path | None,
              expected_task: str | None) -> tuple[Predictor, Any, str, str | None]:
    """(predictor, torch LoadedModel or None, model id, weights fingerprint or None)."""
    from bonescreen.artifact import load_artifact

    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model not found: {path}")
    if backend not in BACKENDS:
        raise ScreenError(f"backend must be one of {', '.join(sorted(BACKENDS))}, got {backend!r}")
    mid = model_id(path)
    if path.suffix.lower() == ".onnx":
        if backend != "onnx":
            raise ModelArtifactError(f"{path.name} is an ONNX file; pass --backend onnx (or the .pt artifact)")
        from bonescreen.onnx_export import load_onnx

        onnx_model = load_onnx(path, expected_task=expected_task, threads=threads)
        _refuse_pediatric_onnx(onnx_model.spec.task, path)
        return onnx_model, None, mid, None
    loaded = load_artifact(path, expected_task=expected_task)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    predictor = BACKENDS[backend](loaded, BackendContext(path, mid, threads, cache_dir))
    return predictor, loaded, mid, loaded.fingerprint


def load_models(
    model: str | os.PathLike[str],
    stage1: str | os.PathLike[str] | None = None,
    *,
    backend: str = "torch",
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelSet:
    """Load the model(s); ``backend="onnx"`` exports a .pt artifact to ONNX once (cached) and runs it."""
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    main, main_t, main_id, main_fp = _load_one(model, backend, threads, cache, None)
    s1 = s1_t = None
    s1_id = ""
    s1_fp = None
    if stage1 is not None and main.spec.task == "pediatric":
        raise ModelArtifactError(PEDIATRIC_CASCADE_REFUSED)
    if stage1 is not None:
        s1, s1_t, s1_id, s1_fp = _load_one(stage1, backend, threads, cache, "stage1")
    return ModelSet(main, s1, main_id, s1_id, backend, main_t, s1_t, main_fp, s1_fp)
