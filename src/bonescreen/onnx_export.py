"""ONNX export and an onnxruntime predictor with the same interface as ``LoadedModel``.

The exported graph takes the preprocessed image as float32 ``(N, H, W)`` in
0..255 and returns class probabilities ``(N, C)`` and the penultimate features
``(N, D)`` (what the out-of-distribution check scores): normalisation and
softmax are inside the graph, so the ONNX file plus its embedded model
description (``metadata_props``) is all ``screen --backend onnx`` needs to
score. The OOD statistics are not embedded (a D×D matrix does not belong in
metadata): screen the ``.pt`` with ``--backend onnx`` to keep the OOD check.
The batch axis is dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonescreen import __version__
from bonescreen.errors import ModelArtifactError
from bonescreen.fsio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from bonescreen.artifact import LoadedModel, ModelSpec

__all__ = [
    "ONNX_FORMAT",
    "ONNX_FORMAT_VERSION",
    "OnnxModel",
    "export_onnx",
    "load_onnx",
    "onnx_format_version",
    "onnx_providers",
    "read_onnx_spec",
    "quantize_onnx",
]

log = logging.getLogger(__name__)

ONNX_FORMAT = "bonescreen-onnx"
ONNX_FORMAT_VERSION = 3  # 2: a second output, the penultimate features; 3: + stage statistics (features.py)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
FEATURES_NAME = "features"


def export_onnx(
    loaded: LoadedModel,
    path: str | os.PathLike[str],
    *,
    opset: int = 18,
    dynamo: bool = True,
    source_id: str | None = None,
) -> Path:
    """Write ``loaded`` as ONNX with a dynamic batch axis and the model description embedded.

    ``dynamo=True`` uses torch.export (the supported exporter in torch 2.x);
    if it fails on an exotic architecture the TorchScript exporter is tried.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = loaded.scoring_module().eval().cpu()
    size = loaded.size
    example = (torch.rand(2, size, size) * 255).round()
    with atomic_path(path) as tmp:
        errors: list[str] = []
        quiet = _Quiet()
        for use_dynamo in ([True, False] if dynamo else [False]):
            try:
                # The exporters print progress on stdout and INFO logs; keep the CLI's output clean.
                with contextlib.redirect_stdout(io.StringIO()), quiet:
                    if use_dynamo:
                        batch = torch.export.Dim("batch", min=1, max=4096)
                        torch.onnx.export(
                            module, (example,), str(tmp), input_names=[INPUT_NAME],
                            output_names=[OUTPUT_NAME, FEATURES_NAME], dynamic_shapes={"image": {0: batch}},
                            opset_version=opset, dynamo=True, external_data=False,
                        )
                    else:
                        torch.onnx.export(
                            module, (example,), str(tmp), input_names=[INPUT_NAME],
                            output_names=[OUTPUT_NAME, FEATURES_NAME],
                            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                          FEATURES_NAME: {0: "batch"}},
                            opset_version=min(opset, 17), dynamo=False,
                        )
                break
            except Exception as exc:  # try the other exporter, report both if both fail
                errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(exc).__name__}: {exc}")
                tmp.unlink(missing_ok=True)
        else:
            raise ModelArtifactError(f"ONNX export of {loaded.spec.arch} failed: {' | '.join(errors)}")

        proto = onnx.load(str(tmp))
        meta = {
            "format": ONNX_FORMAT,
            "format_version": str(ONNX_FORMAT_VERSION),
            "bonescreen_version": __version__,
            "spec": json.dumps({k: v for k, v in asdict(loaded.spec).items() if k != "ood"}),
            "source_model": source_id or (Path(loaded.path).name if loaded.path else ""),
        }
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
    return path


class _Quiet:
    """Raise the exporter loggers (onnxscript, onnx_ir, torch.onnx) to WARNING for a while."""

    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")

    def __enter__(self) -> None:
        self.levels = {n: logging.getLogger(n).level for n in self.names}
        for n in self.names:
            logging.getLogger(n).setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


class OnnxModel:
    """onnxruntime twin of ``LoadedModel``: ``.spec``, ``.size``, ``.predict_proba(uint8 N×H×W)``."""

    backend = "onnx"

    def __init__(self, session: Any, spec: ModelSpec, path: Path, metadata: dict[str, str]) -> None:
        self.session = session
        self.spec = spec
        self.path = path
        self.metadata = metadata
        self.model = None  # no torch module: Grad-CAM needs the .pt artifact

    @property
    def size(self) -> int:
        return int(self.spec.preprocess["size"])

    def predict_proba(self, images: np.ndarray, device: str = "cpu") -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        probs: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0]
        return probs

    def predict_with_features(self, images: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        probs, feats = self.session.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: np.ascontiguousarray(x)})
        return probs, feats

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.predict_with_features(images)[1]

    def score(self, images: np.ndarray, device: str = "cpu") -> np.ndarray:
        return self.predict_proba(images)[:, self.spec.positive_class]


def onnx_format_version(path: str | os.PathLike[str]) -> str | None:
    """The bonescreen ONNX format version recorded in a file (None when unreadable or not ours)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    return meta.get("format_version") if meta.get("format") == ONNX_FORMAT else None


def onnx_providers(device: str, available: list[str] | None = None) -> list[str]:
    """Execution providers for ``device``: TensorRT, then CUDA, then CPU on ``cuda``; CPU alone on ``cpu``.

    ``available`` defaults to ``onnxruntime.get_available_providers()`` (the installed build:
    ``onnxruntime-gpu`` has CUDA and TensorRT, the default wheel only CPU). ``cuda`` without a GPU
    provider is an error, never a silent CPU run.
    """
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ModelArtifactError(f"device must be 'cpu' or 'cuda', got {device!r}")
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        raise ModelArtifactError("--device cuda with onnxruntime needs the onnxruntime-gpu build (CUDA or TensorRT "
                                 f"execution provider); this one has {', '.join(available) or 'none'}")
    return [*gpu, "CPUExecutionProvider"]


def make_session(path: str | os.PathLike[str], threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime session using every core for one batch at a time (CPU unless ``providers`` say so)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def read_onnx_spec(path: str | os.PathLike[str], expected_task: str | None = None) -> tuple[ModelSpec, dict[str, str]]:
    """The embedded model description of a file written by :func:`export_onnx` (clear errors otherwise)."""
    import onnx

    from bonescreen.artifact import ModelSpec

    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelArtifactError(f"{path} is not a readable ONNX model: {exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    del proto
    if meta.get("format") != ONNX_FORMAT:
        raise ModelArtifactError(f"{path} is an ONNX model but not one written by `bonescreen export`")
    if meta.get("format_version") != str(ONNX_FORMAT_VERSION):
        raise ModelArtifactError(
            f"{path} has bonescreen ONNX format version {meta.get('format_version')}; "
            f"this bonescreen ({__version__}) reads version {ONNX_FORMAT_VERSION}"
        )
    try:
        fields = json.loads(meta["spec"])
        spec = ModelSpec(**{k: v for k, v in fields.items() if k in ModelSpec.__dataclass_fields__})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelArtifactError(f"{path}: embedded model description unreadable: {exc}") from exc
    if expected_task is not None and spec.task != expected_task:
        raise ModelArtifactError(f"{path} is a {spec.task!r} model but a {expected_task!r} model was expected")
    return spec, meta


def load_onnx(
    path: str | os.PathLike[str], *, expected_task: str | None = None, threads: int | None = None,
    providers: list[str] | None = None,
) -> OnnxModel:
    """Open an ONNX file written by :func:`export_onnx`; refuse anything else with a clear error."""
    path = Path(path)
    spec, meta = read_onnx_spec(path, expected_task)
    try:
        session = make_session(path, threads, providers)
    except Exception as exc:
        raise ModelArtifactError(f"{path}: onnxruntime cannot load it: {exc}") from exc
    return OnnxModel(session, spec, path, meta)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: str = "static",
    calibration: np.ndarray | None = None,
) -> Path:
    """int8 copy of an exported model (onnxruntime.quantization); metadata is carried over.

    ``static`` (QDQ, per-channel weights) needs ``calibration``: preprocessed
    uint8 images ``(N, H, W)`` representative of the input; ``dynamic``
    quantizes weights only and computes activation scales at run time.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prep = dst.with_name(f".{dst.stem}.prep.onnx")
    quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(prep), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=list(QUANTIZED_OPS))
        elif mode == "static":
            if calibration is None or len(calibration) == 0:
                raise ValueError("static quantization needs calibration images")

            # onnxruntime.quantization ships no type information: its base class is Any to mypy
            class Reader(CalibrationDataReader):  # type: ignore[misc]
                def __init__(self, images: np.ndarray) -> None:
                    self.items = iter([{INPUT_NAME: images[i : i + 1].astype(np.float32)} for i in range(len(images))])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.items, None)

            # Only the compute-heavy ops: quantizing LayerNorm or the softmax output would
            # coarsen the probabilities to 1/255 steps for no speed gain.
            quantize_static(
                str(prep), str(dst), Reader(np.asarray(calibration)), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
        else:
            raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    finally:
        prep.unlink(missing_ok=True)
    # quantize_* keep metadata_props in recent versions; make sure of it.
    src_meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    proto = onnx.load(str(dst))
    have = {p.key for p in proto.metadata_props}
    for k, v in src_meta.items():
        if k not in have:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
    proto.metadata_props.add(key="quantization", value=mode)
    onnx.save(proto, str(dst))
    return dst
