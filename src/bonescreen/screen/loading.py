"""Loading a run's model(s) onto a backend, and the engine built on them.

Above the engine on purpose: reading int8 calibration images uses the engine's own
``prepare`` (same gate and preprocessing as screening), and loading picks a backend with
:mod:`bonescreen.screen.auto`; :mod:`~bonescreen.screen.models` (the registry) and
:mod:`~bonescreen.screen.backends` (its members) stay below the engine, so nothing in the
package imports back up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.errors import BonescreenError, ModelArtifactError
from bonescreen.screen import backends as _backends  # noqa: F401  (its members register themselves)
from bonescreen.screen.auto import choose_backend
from bonescreen.screen.backends import CALIBRATION_IMAGES, resolve_device
from bonescreen.screen.engine import PrepContext, ScreeningEngine, prepare
from bonescreen.screen.gate import GatePolicy
from bonescreen.screen.inputs import iter_inputs
from bonescreen.screen.models import (
    BACKENDS,
    BackendContext,
    ModelSet,
    Predictor,
    ScreenError,
    model_id,
)
from bonescreen.tasks import TASKS, get_task

__all__ = ["backend_label", "calibration_for", "calibration_images", "load_engine", "load_models"]


def calibration_images(inputs: Sequence[str | os.PathLike[str]], loaded: Any,
                       limit: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to ``limit`` images from ``inputs`` that pass the model's gate, preprocessed (uint8 N×S×S).

    Representative pixels for int8 calibration: give preprocessed-able training images (the
    training manifest or folder). The gate applies; the OOD check does not (no features yet).
    """
    size = int(loaded.size)
    pol = GatePolicy.from_eligibility(loaded.spec.eligibility, min_size=min(256, size))
    ctx = PrepContext(pol, (size,), None, False, None)
    imgs = []
    for item in iter_inputs(inputs):
        prep = prepare(item, ctx)
        if prep.images is not None:
            imgs.append(prep.images[size])
        if len(imgs) >= limit:
            break
    if not imgs:
        raise BonescreenError("no eligible calibration image found in --calibration", reason="bad_option")
    return np.stack(imgs)


def _load_one(path: str | os.PathLike[str], backend: str, threads: int | None, cache_dir: Path | None,
              expected_task: str | None, device: str = "cpu", compile: bool = False, calibration: Any = None,
              ) -> tuple[Predictor, Any, str, str | None]:
    """(predictor, torch LoadedModel or None, model id, weights fingerprint or None)."""
    from bonescreen.artifact import load_artifact

    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model not found: {path}")
    if backend not in BACKENDS:
        raise ScreenError(f"backend must be auto or one of {', '.join(sorted(BACKENDS))}, got {backend!r}")
    mid = model_id(path)
    if path.suffix.lower() == ".onnx":
        if backend != "onnx":
            raise ModelArtifactError(f"{path.name} is an ONNX file; pass --backend onnx (or the .pt artifact)")
        from bonescreen.onnx_export import load_onnx, onnx_providers

        onnx_model = load_onnx(path, expected_task=expected_task, threads=threads, providers=onnx_providers(device))
        if not get_task(onnx_model.spec.task).single_input:
            raise ModelArtifactError(f"{path.name} is a {onnx_model.spec.task} model: it has no ONNX export; "
                                     "screen it with --backend torch")
        return onnx_model, None, mid, None
    loaded = load_artifact(path, expected_task=expected_task)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    ctx = BackendContext(path, mid, threads, cache_dir, device=device, compile=compile, calibration=calibration)
    predictor = BACKENDS[backend](loaded, ctx)
    return predictor, loaded, mid, loaded.fingerprint


def backend_label(backend: str, device: str = "cpu", compile: bool = False) -> str:
    """What a row's ``backend`` column says: the registry name, ``+compile``, ``@cuda`` off the CPU."""
    return backend + ("+compile" if compile else "") + ("" if device == "cpu" else f"@{device}")


def load_models(
    model: str | os.PathLike[str],
    stage1: str | os.PathLike[str] | None = None,
    *,
    backend: str = "torch",
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    compile: bool = False,
    calibration: Any = None,
    batch_size: int = 8,
) -> ModelSet:
    """Load the model(s) on ``backend`` (a :data:`BACKENDS` name, or ``auto``: see bonescreen.screen.auto).

    ``backend="onnx"`` (and the OpenVINO/int8 backends) export a .pt artifact to ONNX once
    (cached in ``cache_dir``) and run that; ``device`` is ``cpu``, ``cuda`` or ``auto``.
    """
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    # the main model's calibration images, read once: auto's accuracy guard and the int8 backends share them
    main_calib = calibration_for(model, calibration)
    choice = None
    if backend == "auto":
        choice = choose_backend(model, stage1, threads=threads, cache_dir=cache, device=device,
                                calibration=main_calib, batch_size=batch_size)
        backend = choice.backend
    main, main_t, main_id, main_fp = _load_one(model, backend, threads, cache, None, device, compile, main_calib)
    s1 = s1_t = None
    s1_id = ""
    s1_fp = None
    refusal = getattr(TASKS.get(main.spec.task), "cascade_refusal", "")
    if stage1 is not None and refusal:  # before loading the stage-1 model
        raise ModelArtifactError(refusal)
    if stage1 is not None:
        s1, s1_t, s1_id, s1_fp = _load_one(stage1, backend, threads, cache, "stage1", device, compile,
                                           calibration_for(stage1, calibration))
    ms = ModelSet(main, s1, main_id, s1_id, backend_label(backend, device, compile), main_t, s1_t, main_fp, s1_fp)
    ms.choice = choice.as_dict() if choice is not None else None
    return ms


def calibration_for(path: str | os.PathLike[str], calibration: Any) -> np.ndarray | None:
    """``--calibration`` inputs -> this model's preprocessed calibration images (an array passes through)."""
    if calibration is None or isinstance(calibration, np.ndarray):
        return calibration
    if Path(path).suffix.lower() == ".onnx":
        return None  # a bare ONNX file runs as given (--backend onnx); int8 needs the .pt
    from bonescreen.artifact import load_artifact

    return calibration_images(calibration, load_artifact(path))


def load_engine(model: str | os.PathLike[str], stage1: str | os.PathLike[str] | None = None, *,
                backend: str = "torch", threads: int | None = None,
                cache_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> ScreeningEngine:
    """:func:`load_models` + :class:`ScreeningEngine` (``kwargs``: the engine's policy)."""
    return ScreeningEngine(load_models(model, stage1, backend=backend, threads=threads, cache_dir=cache_dir),
                           **kwargs)
