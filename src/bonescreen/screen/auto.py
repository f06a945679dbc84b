"""``--backend auto``: the fastest accuracy-preserving backend for this model on this machine.

Two steps (README "Backends per instruction set"):

1. **Candidates by instruction set** (:func:`candidates`, from ``/proc/cpuinfo`` flags).
   bf16 is a candidate only where the CPU computes it natively (``avx512_bf16`` or
   ``amx_bf16``): elsewhere it is emulated and was measured 3x (AVX-512 without BF16) to
   12x (AVX2) *slower* than fp32. int8 is a candidate only with VNNI (``avx512_vnni``,
   ``avx_vnni``) or AMX, and only when calibration images are given (``--calibration``).
   fp32 runtimes (PyTorch, onnxruntime, OpenVINO with the throughput or latency hint)
   are candidates everywhere; on a GPU, torch bf16 autocast (AMP) + channels_last,
   torch fp32 and onnxruntime (with its CUDA/TensorRT provider, if installed).
2. **A short probe** (:func:`probe`): every candidate is built, checked and timed on the
   same batch, interleaved (a warm-up call, then ``repeats`` timed calls each, the median
   kept). Checks, so that the choice never costs accuracy: an fp32 candidate must match
   eager PyTorch within 1e-4 (else it is dropped: a broken runtime); a reduced-precision
   candidate, when calibration images are given, is compared with eager on the half of
   them not used to calibrate, and dropped when its ranking could move the AUC by more
   than 0.005 (:func:`auc_shift_bound`: discordant pairs over n²/4, the worst case of a
   50 % prevalence; a label-free guard, not an AUC measurement). The fastest survivor wins.

The choice is cached per model (sha256) + machine (CPU model, flags, cores, threads,
device, batch size, library versions) in ``$BONESCREEN_CACHE_DIR/backend-choice.json``
(default ``~/.cache/bonescreen/``), so later runs start at once; ``run.json`` records
the choice with its timings and every row names the backend in its ``backend`` column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.screen.models import BACKENDS, BackendContext, ScreenError, model_id
from bonescreen.tasks import get_task

__all__ = [
    "MAX_AUC_SHIFT",
    "Candidate",
    "Choice",
    "Machine",
    "auc_shift_bound",
    "candidates",
    "choose_backend",
    "probe",
    "read_machine",
]

log = logging.getLogger(__name__)

#: fp32 candidates must match eager within this (max |probability difference|).
FP32_TOLERANCE = 1e-4
#: Reduced-precision candidates may move the AUC by at most this (worst-case bound).
MAX_AUC_SHIFT = 0.005
#: Images per timed probe call (at most the run's batch size).
PROBE_BATCH = 4
CACHE_VERSION = 1


@dataclass(frozen=True)
class Machine:
    """The facts of this machine that decide the candidates."""

    model: str
    flags: frozenset[str]
    cores: int

    @property
    def bf16(self) -> bool:
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def vnni(self) -> bool:
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def isa(self) -> str:
        """A short name of the widest vector ISA, as the README's table names it."""
        if self.flags & {"amx_bf16", "amx_int8", "amx_tile"}:
            return "AMX"
        if "avx512_bf16" in self.flags:
            return "AVX-512-BF16"
        if "avx512f" in self.flags:
            return "AVX-512-VNNI" if "avx512_vnni" in self.flags else "AVX-512"
        if "avx2" in self.flags:
            return "AVX2-VNNI" if "avx_vnni" in self.flags else "AVX2"
        return "other"


def read_machine(cpuinfo: str | None = None) -> Machine:
    """CPU model and flags from ``/proc/cpuinfo`` (or the text given: tests fake it)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return Machine(model or "unknown", frozenset(flags), cores)


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str  # fp32 | bf16 | int8
    why: str


def candidates(machine: Machine, *, device: str = "cpu", pediatric: bool = False, calibrated: bool = False,
               onnx_gpu: bool = False) -> list[Candidate]:
    """The backends worth probing here, in the order they are listed in the README."""
    if pediatric:
        return [Candidate("torch", "fp32", "pediatric models (image + clinical inputs) run on torch only")]
    if device == "cuda":
        out = [Candidate("torch-bf16-channels-last", "bf16", "GPU: bf16 autocast (AMP) + channels_last"),
               Candidate("torch", "fp32", "GPU: fp32 reference")]
        if onnx_gpu:
            out.append(Candidate("onnx", "fp32", "GPU: onnxruntime with the TensorRT/CUDA provider"))
        return out
    out = [Candidate("torch", "fp32", "eager fp32: the reference"),
           Candidate("onnx", "fp32", "onnxruntime fp32"),
           Candidate("openvino", "fp32", "OpenVINO fp32, throughput hint (streams, async requests)"),
           Candidate("openvino-latency", "fp32", "OpenVINO fp32, latency hint")]
    if machine.bf16:
        out += [Candidate("torch-bf16", "bf16", f"{machine.isa}: native bf16 dot products"),
                Candidate("openvino-bf16", "bf16", f"{machine.isa}: native bf16 dot products")]
    if machine.vnni and calibrated:
        out += [Candidate("openvino-int8", "int8", f"{machine.isa}: int8 dot products (VNNI), calibrated"),
                Candidate("onnx-int8", "int8", f"{machine.isa}: int8 dot products (VNNI), calibrated")]
    return out


def auc_shift_bound(reference: np.ndarray, scores: np.ndarray) -> float:
    """Worst-case AUC change if ``scores`` replaced ``reference``: discordant pairs / (n²/4).

    An AUC counts positive-negative pairs in the right order; a pair whose order differs
    between the two scorings can change it by one pair. At most n²/4 pairs are
    positive-negative (at 50 % prevalence), so that is the (label-free) bound.
    """
    r, s = np.asarray(reference, float), np.asarray(scores, float)
    n = len(r)
    if n < 2:
        return 0.0
    dr = np.sign(r[:, None] - r[None, :])
    ds = np.sign(s[:, None] - s[None, :])
    discordant = int(np.triu((dr * ds) < 0, 1).sum())
    return discordant / (n * n / 4.0)


@dataclass
class Choice:
    backend: str
    reason: str
    isa: str
    from_cache: bool = False
    seconds_per_image: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    key: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe(predictors: Mapping[str, Any], precisions: Mapping[str, str], images: np.ndarray, *,
          check_images: np.ndarray | None = None, repeats: int = 2, positive: int = 1,
          clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict[str, float], dict[str, str]]:
    """(fastest accepted backend, seconds per image of each, rejected -> why); ``torch`` is the reference."""
    if "torch" not in predictors:
        raise ValueError("the probe needs the eager reference ('torch')")
    ref = predictors["torch"]
    rejected: dict[str, str] = {}
    ref_p = np.asarray(ref.predict_proba(images))  # also the warm-up of the reference
    ref_check = None if check_images is None else np.asarray(ref.predict_proba(check_images))[:, positive]
    alive: dict[str, Any] = {"torch": ref}
    for name, pred in predictors.items():
        if name == "torch":
            continue
        try:
            p = np.asarray(pred.predict_proba(images))  # warm-up + parity
            if precisions[name] == "fp32":
                diff = float(np.abs(p - ref_p).max())
                if not diff <= FP32_TOLERANCE:
                    rejected[name] = f"max |p - eager| {diff:.2e} > {FP32_TOLERANCE:g}"
                    continue
            elif ref_check is not None:
                shift = auc_shift_bound(ref_check, np.asarray(pred.predict_proba(check_images))[:, positive])
                if shift > MAX_AUC_SHIFT:
                    rejected[name] = f"ranking could move the AUC by up to {shift:.4f} > {MAX_AUC_SHIFT}"
                    continue
        except Exception as exc:  # one runtime failing must not stop the choice
            rejected[name] = f"{type(exc).__name__}: {exc}"
            continue
        alive[name] = pred
    times: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(max(1, repeats)):
        for name, pred in alive.items():  # interleaved: a load spike hits every candidate alike
            t0 = clock()
            pred.predict_proba(images)
            times[name].append(clock() - t0)
    per_image = {name: statistics.median(ts) / len(images) for name, ts in times.items()}
    best = min(per_image, key=lambda k: per_image[k])
    return best, per_image, rejected


def cache_file() -> Path:
    base = os.environ.get("BONESCREEN_CACHE_DIR")
    root = Path(base).expanduser() if base else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "bonescreen"
    return root / "backend-choice.json"


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "onnxruntime", "openvino"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:
            out[mod] = "absent"
    return out


def _cache_key(ids: Sequence[str], machine: Machine, device: str, threads: int | None, batch: int,
               names: Sequence[str], calib_digest: str) -> str:
    facts = {"v": CACHE_VERSION, "models": list(ids), "cpu": machine.model, "flags": sorted(machine.flags),
             "cores": machine.cores, "threads": threads, "device": device, "batch": batch,
             "candidates": list(names), "calibration": calib_digest, "versions": _versions()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, choice: Choice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = {k: v for k, v in choice.as_dict().items() if k not in ("from_cache", "key")}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop screening
        log.warning("backend choice not cached (%s)", exc)


def choose_backend(model: str | os.PathLike[str], stage1: str | os.PathLike[str] | None = None, *,
                   threads: int | None = None, cache_dir: Path | None = None, device: str = "cpu",
                   calibration: Any = None, batch_size: int = 8, machine: Machine | None = None,
                   cache: Path | None = None, repeats: int = 2) -> Choice:
    """Candidates for this machine, then the probe (or the cached result of an earlier one)."""
    from bonescreen.artifact import load_artifact

    machine = machine or read_machine()
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return Choice("onnx", "an .onnx file runs on onnxruntime", machine.isa)
    loaded = load_artifact(path)
    onnx_gpu = False
    if device == "cuda":
        try:
            import onnxruntime as ort

            onnx_gpu = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))
        except ImportError:
            pass
    cands = [c for c in candidates(machine, device=device, pediatric=not get_task(loaded.spec.task).single_input,
                                   calibrated=calibration is not None, onnx_gpu=onnx_gpu) if c.backend in BACKENDS]
    if len(cands) == 1:
        return Choice(cands[0].backend, cands[0].why, machine.isa)
    calib = None
    if calibration is not None:
        calib = np.asarray(calibration)  # preprocessed by bonescreen.screen.loading.calibration_images
    digest = hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest()[:12] if calib is not None else ""
    ids = [model_id(path)] + ([model_id(stage1)] if stage1 else [])
    key = _cache_key(ids, machine, device, threads, batch_size, [c.backend for c in cands], digest)
    store = cache or cache_file()
    hit = _read_cache(store).get(key)
    if isinstance(hit, dict) and hit.get("backend") in BACKENDS:
        fields = {k: hit[k] for k in ("backend", "reason", "isa", "seconds_per_image", "rejected") if k in hit}
        log.info("backend auto: %s (cached choice for this model and machine)", hit["backend"])
        return Choice(**fields, from_cache=True, key=key)

    n = max(1, min(batch_size, PROBE_BATCH))
    size = int(loaded.size)
    # as the int8 backends do (backends._calibration): even images calibrate, odd ones check
    calib_fit = None if calib is None else calib[0::2]
    check = None if calib is None or len(calib) < 5 else calib[1::2]
    if calib_fit is not None and len(calib_fit) >= n:
        images = calib_fit[:n]
    else:
        images = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)
    precisions = {c.backend: c.precision for c in cands}
    predictors: dict[str, Any] = {}
    rejected: dict[str, str] = {}
    mid = ids[0]
    t0 = time.perf_counter()
    for c in cands:
        ctx = BackendContext(path, mid, threads, cache_dir, device=device,
                             calibration=calib if c.precision == "int8" else None)
        try:
            predictors[c.backend] = BACKENDS[c.backend](loaded, ctx)
        except Exception as exc:
            if c.backend == "torch":
                raise
            rejected[c.backend] = f"{type(exc).__name__}: {exc}"
    if "torch" not in predictors:
        raise ScreenError("backend auto: the eager reference could not be built")
    best, per_image, bad = probe(predictors, precisions, images, check_images=check, repeats=repeats,
                                 positive=int(loaded.spec.positive_class))
    rejected.update(bad)
    why = next(c.why for c in cands if c.backend == best)
    speed = per_image["torch"] / per_image[best]
    choice = Choice(best, f"{why}; fastest in the probe ({speed:.2f}x eager, {len(per_image)} candidates "
                          f"timed in {time.perf_counter() - t0:.0f} s)", machine.isa,
                    seconds_per_image={k: round(v, 5) for k, v in per_image.items()}, rejected=rejected, key=key)
    log.info("backend auto on %s: %s; s/img %s; rejected %s", machine.isa, best, choice.seconds_per_image,
             rejected or "none")
    _write_cache(store, key, choice)
    return choice
