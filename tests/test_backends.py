"""Inference backends: fp32 parity with eager, reduced precision within 0.005 AUC, and ``--backend auto``.

Parity (fp32 backends): probabilities and the penultimate features (what the OOD check
scores) within 1e-4 of eager PyTorch. Reduced precision (bf16, int8): AUC on held-out
images of a small trained model within 0.005 of eager's. ``auto``: the candidates per
instruction set from a faked ``/proc/cpuinfo``, the probe's choice (fastest accepted,
a faked clock), its guards, the cache, and the record in run.json and every row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _screen_helpers import make_artifact, radiograph
from _train_helpers import blob_image, trained_teacher

from bonescreen.screen import BACKENDS, ScreenOptions, load_models, screen
from bonescreen.screen.auto import (
    MAX_AUC_SHIFT,
    Machine,
    auc_shift_bound,
    candidates,
    choose_backend,
    probe,
    read_machine,
)
from bonescreen.screen.backends import PRECISION, TorchPredictor, resolve_device
from bonescreen.screen.models import BackendContext, ScreenError

FP32 = [b for b, p in PRECISION.items() if p == "fp32" and b != "torch"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("backends")
    return make_artifact(d / "m.pt", "stage2"), d / "cache"


def _ctx(path: Path, cache: Path, **kw: Any) -> BackendContext:
    from bonescreen.screen.models import model_id

    return BackendContext(path, model_id(path), 1, cache, **kw)


def test_every_backend_is_registered_with_a_precision() -> None:
    assert set(PRECISION) == set(BACKENDS)


def test_fp32_backends_match_eager(artifact: tuple[Path, Path]) -> None:
    from bonescreen.artifact import load_artifact

    path, cache = artifact
    loaded = load_artifact(path)
    x = np.stack([np.asarray(radiograph(i, (64, 64)) // 16, dtype=np.uint8) for i in range(5)])
    ref_p, ref_f = loaded.predict_with_features(x)
    for name in FP32:
        pred = BACKENDS[name](loaded, _ctx(path, cache))
        p, f = pred.predict_with_features(x)
        assert np.abs(p - ref_p).max() <= 1e-4, name
        assert np.abs(f - ref_f).max() <= 1e-4, name
        assert np.abs(pred.predict_proba(x[:1]) - ref_p[:1]).max() <= 1e-4, name  # batch of one


def test_torch_compile_wraps_the_same_graph(artifact: tuple[Path, Path]) -> None:
    """--compile captures the scoring graph with torch.compile; the 'eager' compiler backend keeps this quick
    (inductor's code generation takes minutes on a loaded 2-core machine; `screen --compile` uses inductor)."""
    from bonescreen.artifact import load_artifact

    loaded = load_artifact(artifact[0])
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    pred = TorchPredictor(loaded, compile=True, compile_backend="eager")
    assert type(pred.graph).__name__ == "OptimizedModule"
    assert np.abs(pred.predict_with_features(x)[0] - loaded.predict_with_features(x)[0]).max() <= 1e-5


def test_reduced_precision_backends_keep_the_auc(tmp_path_factory: pytest.TempPathFactory) -> None:
    """bf16 and the calibrated int8 copies: AUC within 0.005 of eager fp32 on 160 held-out images."""
    from sklearn.metrics import roc_auc_score

    from bonescreen.artifact import load_artifact
    from bonescreen.preprocess import preprocess_array

    t = trained_teacher(tmp_path_factory)
    path = Path(t["result"].artifact_path)
    loaded = load_artifact(path)
    size = loaded.size
    rng = np.random.default_rng(123)
    y = np.arange(160) % 2
    x = np.stack([preprocess_array(blob_image(int(k), size, rng).astype(np.float32), size) for k in y])
    calib = np.stack([preprocess_array(blob_image(k % 2, size, rng).astype(np.float32), size) for k in range(32)])
    pos = loaded.spec.positive_class
    ref = roc_auc_score(y, loaded.predict_proba(x)[:, pos])
    assert ref > 0.7  # a model that learned something: the comparison means something
    cache = tmp_path_factory.mktemp("rp")
    for name in [b for b, p in PRECISION.items() if p != "fp32"]:
        pred = BACKENDS[name](loaded, _ctx(path, cache, calibration=calib))
        auc = roc_auc_score(y, np.concatenate([pred.predict_proba(x[i:i + 32]) for i in range(0, len(x), 32)])[:, pos])
        assert abs(auc - ref) <= 0.005, (name, auc, ref)


def test_int8_needs_calibration(artifact: tuple[Path, Path]) -> None:
    from bonescreen.artifact import load_artifact

    path, cache = artifact
    with pytest.raises(ScreenError, match="--calibration"):
        BACKENDS["onnx-int8"](load_artifact(path), _ctx(path, cache))


# ---------------------------------------------------------------- device selection


def test_device_and_onnx_provider_selection() -> None:
    from bonescreen.errors import ModelArtifactError
    from bonescreen.onnx_export import onnx_providers

    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(ScreenError, match="no CUDA"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ScreenError):
        resolve_device("tpu", cuda_available=False)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda", gpu) == gpu
    assert onnx_providers("cuda", gpu[1:]) == gpu[1:]
    assert onnx_providers("cpu", gpu) == ["CPUExecutionProvider"]
    with pytest.raises(ModelArtifactError, match="onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])


def test_cuda_backends_go_to_the_gpu_with_amp(monkeypatch: pytest.MonkeyPatch, artifact: tuple[Path, Path]) -> None:
    """--device cuda: torch backends become TorchPredictor on cuda (bf16 = AMP); OpenVINO is refused."""
    from bonescreen.artifact import load_artifact

    path, cache = artifact
    loaded = load_artifact(path)
    made: list[dict[str, Any]] = []

    class Spy:
        def __init__(self, loaded: Any, **kw: Any) -> None:
            made.append(kw)

    import bonescreen.screen.backends as backends

    monkeypatch.setattr(backends, "TorchPredictor", Spy)
    BACKENDS["torch"](loaded, _ctx(path, cache, device="cuda"))
    BACKENDS["torch-bf16-channels-last"](loaded, _ctx(path, cache, device="cuda", compile=True))
    assert made == [{"device": "cuda", "bf16": False, "channels_last": False, "compile": False},
                    {"device": "cuda", "bf16": True, "channels_last": True, "compile": True}]
    assert BACKENDS["torch"](loaded, _ctx(path, cache)) is loaded  # CPU fp32: the eager reference itself
    with pytest.raises(ScreenError, match="CPU"):
        BACKENDS["openvino"](loaded, _ctx(path, cache, device="cuda"))


# ---------------------------------------------------------------- auto

CPUINFO = "processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
AVX2 = "fpu sse2 avx avx2 fma"
AVX512_VNNI = AVX2 + " avx512f avx512dq avx512bw avx512vl avx512_vnni"
AVX512_BF16 = AVX512_VNNI + " avx512_bf16"
AMX = AVX512_BF16 + " amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("flags,isa,bf16,int8", [
    (AVX2, "AVX2", False, False),
    (AVX2 + " avx_vnni", "AVX2-VNNI", False, True),
    (AVX512_VNNI, "AVX-512-VNNI", False, True),
    (AVX512_BF16, "AVX-512-BF16", True, True),
    (AMX, "AMX", True, True),
])
def test_candidates_by_instruction_set(flags: str, isa: str, bf16: bool, int8: bool) -> None:
    m = read_machine(CPUINFO.format(flags=flags))
    assert m.model == "Fake CPU" and m.isa == isa
    names = {c.backend for c in candidates(m, calibrated=True)}
    assert {"torch", "onnx", "openvino", "openvino-latency"} <= names
    assert bool(names & {"torch-bf16", "openvino-bf16"}) is bf16
    assert bool(names & {"onnx-int8", "openvino-int8"}) is int8
    # without calibration images no int8 candidate; a pediatric model runs on torch alone
    assert not any(PRECISION[c.backend] == "int8" for c in candidates(m, calibrated=False))
    assert [c.backend for c in candidates(m, pediatric=True)] == ["torch"]
    gpu = [c.backend for c in candidates(m, device="cuda")]
    assert gpu[0] == "torch-bf16-channels-last" and "openvino" not in gpu


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakePredictor:
    """Returns ``probs`` (optionally perturbed) and advances the fake clock by ``cost`` per call."""

    def __init__(self, clock: FakeClock, cost: float, noise: float = 0.0, fail: bool = False) -> None:
        self.clock, self.cost, self.noise, self.fail = clock, cost, noise, fail

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("no kernel for this op")
        self.clock.t += self.cost
        m = images.reshape(len(images), -1).mean(axis=1) / 255.0
        m = m + self.noise * np.sin(np.arange(len(m)) * 7.0)
        return np.stack([1 - m, m], axis=1)


def test_probe_picks_the_fastest_accepted_backend() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    check = rng.integers(0, 256, (32, 8, 8), dtype=np.uint8)
    preds = {"torch": FakePredictor(clock, 1.0), "onnx": FakePredictor(clock, 0.8),
             "openvino": FakePredictor(clock, 0.3, noise=1e-3),  # fastest, but not fp32-equal: dropped
             "openvino-int8": FakePredictor(clock, 0.2, noise=0.05),  # reorders images: dropped
             "torch-bf16": FakePredictor(clock, 0.5, noise=1e-5),  # keeps the ranking: accepted
             "onnx-int8": FakePredictor(clock, 0.1, fail=True)}
    prec = {k: PRECISION[k] for k in preds}
    best, per_image, rejected = probe(preds, prec, x, check_images=check, clock=clock)
    assert best == "torch-bf16"
    assert set(rejected) == {"openvino", "openvino-int8", "onnx-int8"}
    assert "> 0.0001" in rejected["openvino"] and "AUC" in rejected["openvino-int8"]
    assert per_image == pytest.approx({"torch": 0.25, "onnx": 0.2, "torch-bf16": 0.125})
    # without reduced-precision candidates the fastest fp32 runtime wins
    best, _, _ = probe({k: preds[k] for k in ("torch", "onnx")}, prec, x, clock=clock)
    assert best == "onnx"


def test_auc_shift_bound() -> None:
    r = np.linspace(0, 1, 20)
    assert auc_shift_bound(r, r) == 0.0
    assert auc_shift_bound(r, r ** 2) == 0.0  # a monotone change keeps every AUC
    swapped = r.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert auc_shift_bound(r, swapped) == pytest.approx(1 / 100)  # one pair of 20²/4
    assert auc_shift_bound(r, -r) > MAX_AUC_SHIFT


def test_auto_probes_once_then_uses_the_cache(artifact: tuple[Path, Path], tmp_path: Path) -> None:
    path, cache = artifact
    m = Machine("Fake AVX2", frozenset(AVX2.split()), 2)
    store = tmp_path / "choice.json"
    first = choose_backend(path, machine=m, cache=store, cache_dir=cache, batch_size=2, threads=1, repeats=1)
    assert not first.from_cache and first.backend in {"torch", "onnx", "openvino", "openvino-latency"}
    assert set(first.seconds_per_image) | set(first.rejected) == {"torch", "onnx", "openvino", "openvino-latency"}
    assert first.isa == "AVX2" and "fastest in the probe" in first.reason
    again = choose_backend(path, machine=m, cache=store, cache_dir=cache, batch_size=2, threads=1)
    assert again.from_cache and again.backend == first.backend
    # another machine (here: other flags) probes again
    other = Machine("Fake AVX2", frozenset(AVX512_VNNI.split()), 2)
    assert choose_backend(path, machine=other, cache=store, cache_dir=cache, batch_size=2, threads=1,
                          repeats=1).from_cache is False


def test_screen_records_the_auto_choice(artifact: tuple[Path, Path], tmp_path: Path, write_dicom,  # type: ignore[no-untyped-def]
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = artifact
    monkeypatch.setenv("BONESCREEN_CACHE_DIR", str(tmp_path / "cache"))
    for i in range(3):
        write_dicom(radiograph(i), name=f"in/{i}.dcm")
    s = screen([tmp_path / "in"], path, tmp_path / "out", backend="auto",
               options=ScreenOptions(progress=False, batch_size=2, device="cpu"))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    chosen = run["backend_choice"]["backend"]
    assert run["backend"] == chosen == s.backend and run["engine"] == "local"
    assert run["backend_choice"]["isa"] == read_machine().isa
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in rows} == {chosen} and s.n_screened == 3
    assert json.loads((tmp_path / "cache" / "backend-choice.json").read_text())  # cached for the next run
    # load_models refuses a name outside the registry
    with pytest.raises(ScreenError, match="backend must be"):
        load_models(path, backend="tensorflow")
