"""The inference backends of the registry (:data:`bonescreen.screen.models.BACKENDS`).

Every backend turns a loaded ``.pt`` artifact into a predictor with
``predict_proba`` and ``predict_with_features`` (probabilities + the
penultimate features the out-of-distribution check scores). They all run the
same computation, :meth:`bonescreen.artifact.LoadedModel.scoring_module`
(normalisation and softmax inside), in another runtime or precision:

====================================  =========  =================================================
name                                  precision  what
====================================  =========  =================================================
``torch``                             fp32       PyTorch eager (the reference every parity test uses)
``torch-channels-last``               fp32       eager, NHWC memory format (oneDNN's preferred layout)
``torch-bf16``                        bf16       autocast (CPU: fast only with AVX512_BF16 / AMX; CUDA: AMP)
``torch-bf16-channels-last``          bf16       both (the usual GPU recipe)
``onnx``                              fp32       onnxruntime (TensorRT / CUDA provider with ``--device cuda``)
``onnx-int8``                         int8       onnxruntime, static QDQ int8 calibrated on ``--calibration`` images
``openvino``                          fp32       OpenVINO CPU, throughput hint: several streams, async requests
``openvino-latency``                  fp32       OpenVINO CPU, latency hint: one stream over all cores
``openvino-bf16``                     bf16       OpenVINO CPU, bf16 inference precision (AVX512_BF16 / AMX)
``openvino-int8``                     int8       OpenVINO CPU running the calibrated QDQ int8 graph (VNNI / AMX)
====================================  =========  =================================================

``--device cuda`` moves the torch backends to the GPU (bf16 autocast there is
AMP) and gives onnxruntime the TensorRT/CUDA providers; ``--compile`` wraps a
torch backend's graph in ``torch.compile`` (opt-in: minutes of compilation
first). ``auto`` (:mod:`bonescreen.screen.auto`) picks one of these per
machine. ONNX exports and int8 copies are cached next to each other by the
artifact's sha256 (and the calibration images' hash), so they are made once.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.errors import ModelArtifactError
from bonescreen.screen.models import BackendContext, Predictor, ScreenError, register_backend
from bonescreen.tasks import get_task

__all__ = [
    "CALIBRATION_IMAGES",
    "PRECISION",
    "OpenVinoModel",
    "TorchPredictor",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: Numerical precision of each backend: ``fp32`` backends must match eager within 1e-4
#: (tests/test_backends.py); ``bf16``/``int8`` ones are reduced precision (AUC-checked).
PRECISION = {
    "torch": "fp32", "torch-channels-last": "fp32", "torch-bf16": "bf16", "torch-bf16-channels-last": "bf16",
    "onnx": "fp32", "onnx-int8": "int8",
    "openvino": "fp32", "openvino-latency": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8",
}
#: Eligible images used to calibrate an int8 copy (as ``bonescreen export --calibration``).
CALIBRATION_IMAGES = 64

TORCH_VARIANTS = {  # name -> (bf16 autocast, channels_last)
    "torch": (False, False), "torch-channels-last": (False, True),
    "torch-bf16": (True, False), "torch-bf16-channels-last": (True, True),
}


def resolve_device(device: str, cuda_available: bool | None = None) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ScreenError(f"--device must be auto, cpu or cuda; got {device!r}")
    if cuda_available is None:
        import torch

        cuda_available = bool(torch.cuda.is_available())
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ScreenError("--device cuda: torch sees no CUDA GPU (is this the CPU build of torch?)")
    return device


def _refuse_pediatric(loaded: Any, ctx: BackendContext, name: str) -> None:
    """Only the eager torch model runs a task without a single-input scoring graph (image + clinical)."""
    if not get_task(loaded.spec.task).single_input:
        raise ModelArtifactError(
            f"{ctx.path.name} is a {loaded.spec.task} model: it takes the image and the clinical variables (two "
            f"inputs), which the {name} backend does not run; screen it with --backend torch"
        )


# --------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------


class TorchPredictor:
    """The artifact's scoring graph on a device, optionally bf16 autocast, channels_last and compiled."""

    def __init__(self, loaded: Any, *, device: str = "cpu", bf16: bool = False, channels_last: bool = False,
                 compile: bool = False, compile_backend: str = "inductor") -> None:
        import torch

        self.loaded = loaded
        self.spec = loaded.spec
        self.path = loaded.path
        self.device = torch.device(device)
        self.bf16 = bf16
        self.channels_last = channels_last
        graph = loaded.scoring_module().eval().to(self.device)
        if channels_last:
            graph = graph.to(memory_format=torch.channels_last)
        # dynamic=False: one graph per batch size (a run has one batch size plus its last, shorter batch)
        self.graph = torch.compile(graph, dynamic=False, backend=compile_backend) if compile else graph

    @property
    def size(self) -> int:
        return int(self.loaded.size)

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if x.ndim == 2:
            x = x[None]
        x = x.to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with torch.inference_mode(), amp:
            probs, feats = self.graph(x)
        return probs.float().cpu().numpy(), feats.float().cpu().numpy()

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.predict_with_features(images)[0]


def _torch_factory(name: str) -> Any:
    bf16, channels_last = TORCH_VARIANTS[name]

    def factory(loaded: Any, ctx: BackendContext) -> Predictor:
        if not get_task(loaded.spec.task).single_input:
            if name != "torch":
                _refuse_pediatric(loaded, ctx, name)
            if ctx.device != "cpu" or ctx.compile:
                raise ModelArtifactError(f"{ctx.path.name} is a {loaded.spec.task} model: it runs on the CPU with "
                                         "--backend torch (no --device cuda, no --compile)")
            return loaded  # type: ignore[no-any-return]
        if name == "torch" and ctx.device == "cpu" and not ctx.compile:
            return loaded  # type: ignore[no-any-return]  # the eager reference itself
        return TorchPredictor(loaded, device=ctx.device, bf16=bf16, channels_last=channels_last,
                              compile=ctx.compile)

    return factory


for _name in TORCH_VARIANTS:
    register_backend(_name)(_torch_factory(_name))


# --------------------------------------------------------------------------
# ONNX (onnxruntime) and the int8 copy
# --------------------------------------------------------------------------


def _cache(ctx: BackendContext) -> Path:
    cache = ctx.cache_dir or ctx.path.parent
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def exported_onnx(loaded: Any, ctx: BackendContext) -> Path:
    """The artifact's ONNX export, made once and cached by its sha256."""
    from bonescreen.onnx_export import ONNX_FORMAT_VERSION, export_onnx, onnx_format_version

    onnx_path = _cache(ctx) / f"{ctx.path.stem}.{ctx.model_id.rsplit('@', 1)[1]}.onnx"
    if not onnx_path.is_file() or onnx_format_version(onnx_path) != str(ONNX_FORMAT_VERSION):
        log.info("exporting %s to ONNX (%s)", ctx.path.name, onnx_path)
        export_onnx(loaded, onnx_path, source_id=ctx.model_id)
    return onnx_path


def _calibration(loaded: Any, ctx: BackendContext) -> np.ndarray:
    if ctx.calibration is None:
        raise ScreenError("an int8 backend needs --calibration IMAGES (eligible training images, up to "
                          f"{CALIBRATION_IMAGES} are used): static quantization sets its scales on them")
    imgs = np.asarray(ctx.calibration)  # preprocessed by bonescreen.screen.loading.calibration_images
    # every other image calibrates; the rest stay held out for auto's accuracy guard (bonescreen.screen.auto)
    return imgs[0::2] if len(imgs) > 1 else imgs


def int8_onnx(loaded: Any, ctx: BackendContext) -> Path:
    """Static QDQ int8 copy of the export (Conv/MatMul/Gemm), cached by model and calibration hash."""
    from bonescreen.onnx_export import quantize_onnx

    calib = _calibration(loaded, ctx)
    digest = hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest()[:12]
    dst = _cache(ctx) / f"{ctx.path.stem}.{ctx.model_id.rsplit('@', 1)[1]}.int8-{digest}.onnx"
    if not dst.is_file():
        log.info("quantizing %s to int8 on %d calibration images (%s)", ctx.path.name, len(calib), dst)
        quantize_onnx(exported_onnx(loaded, ctx), dst, mode="static", calibration=calib)
    return dst


def _ort(loaded: Any, ctx: BackendContext, path: Path) -> Predictor:
    from bonescreen.onnx_export import load_onnx, onnx_providers

    model = load_onnx(path, threads=ctx.threads, providers=onnx_providers(ctx.device))
    model.spec = loaded.spec  # the artifact's description, OOD part included
    return model


@register_backend("onnx")
def _onnx_backend(loaded: Any, ctx: BackendContext) -> Predictor:
    """Export the .pt once (cached by its sha256) and run onnxruntime; the OOD part stays the .pt's."""
    _refuse_pediatric(loaded, ctx, "onnx")
    return _ort(loaded, ctx, exported_onnx(loaded, ctx))


@register_backend("onnx-int8")
def _onnx_int8_backend(loaded: Any, ctx: BackendContext) -> Predictor:
    _refuse_pediatric(loaded, ctx, "onnx-int8")
    return _ort(loaded, ctx, int8_onnx(loaded, ctx))


# --------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------


class OpenVinoModel:
    """An exported graph compiled by OpenVINO for the CPU; same interface as ``LoadedModel``.

    ``hint="THROUGHPUT"`` splits the cores into streams and runs one asynchronous request per
    image, so a batch keeps every core busy without one big GEMM per layer (what makes OpenVINO
    fast on many cores); ``LATENCY`` runs the whole batch as one request on one stream.
    """

    def __init__(self, path: Path, spec: Any, *, hint: str = "THROUGHPUT", precision: str = "f32",
                 threads: int | None = None, cache_dir: Path | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:
            raise ModelArtifactError(f"{path}: OpenVINO cannot compile it: {exc}") from exc
        self.spec = spec
        self.path = path
        self.hint = hint
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if hint == "THROUGHPUT" else 1
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests) if self.requests > 1 else None

    @property
    def size(self) -> int:
        return int(self.spec.preprocess["size"])

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        if self._queue is None or len(x) == 1:
            out = self.compiled({0: np.ascontiguousarray(x)})
            return np.asarray(out[0]), np.asarray(out[1])
        probs: list[Any] = [None] * len(x)
        feats: list[Any] = [None] * len(x)

        def done(request: Any, i: int) -> None:
            probs[i] = request.get_output_tensor(0).data.copy()
            feats[i] = request.get_output_tensor(1).data.copy()

        self._queue.set_callback(done)
        for i in range(len(x)):
            self._queue.start_async({0: np.ascontiguousarray(x[i : i + 1])}, i)
        self._queue.wait_all()
        return np.concatenate(probs), np.concatenate(feats)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.predict_with_features(images)[0]


def _openvino_factory(name: str, hint: str, precision: str, int8: bool) -> Any:
    def factory(loaded: Any, ctx: BackendContext) -> Predictor:
        _refuse_pediatric(loaded, ctx, name)
        if ctx.device != "cpu":
            raise ScreenError(f"the {name} backend runs on the CPU; with --device cuda use a torch or onnx backend")
        path = int8_onnx(loaded, ctx) if int8 else exported_onnx(loaded, ctx)
        return OpenVinoModel(path, loaded.spec, hint=hint, precision=precision, threads=ctx.threads,
                             cache_dir=_cache(ctx) / "openvino")

    return factory


for _name, _hint, _prec, _int8 in (("openvino", "THROUGHPUT", "f32", False),
                                   ("openvino-latency", "LATENCY", "f32", False),
                                   ("openvino-bf16", "THROUGHPUT", "bf16", False),
                                   ("openvino-int8", "THROUGHPUT", "f32", True)):
    register_backend(_name)(_openvino_factory(_name, _hint, _prec, _int8))
