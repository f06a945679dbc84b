"""Screening benchmarks: model throughput per engine, FLOP-bound fraction, peak memory, preprocessing.

Sections (``--sections``; default all but ``accuracy``):

- ``throughput``: images/s of convnext_small at 512 px (random weights; speed
  does not depend on the values) for PyTorch eager fp32 (the baseline), eager
  bf16 autocast, onnxruntime fp32, onnxruntime int8 static (QDQ) and dynamic,
  at batch sizes 1/4/8; the median of ``--repeats`` timed runs after a warm-up,
  all in this one process.
- ``flops``: FLOPs per image (``torch.utils.flop_counter``) and the fraction of
  the CPU's FMA peak each engine reaches (arithmetic printed).
- ``preprocess``: decode + preprocess of a 2000x2000 16-bit DICOM, images/s on
  one core, relative to the model's images/s (is preprocessing the bottleneck?).
- ``memory``: peak RSS of a ``screen`` run over N vs 10N small synthetic
  DICOMs (convnext_atto at 64 px so it runs in minutes), each in a fresh process.
- ``accuracy``: AUC of fp32 vs int8 vs bf16 on a labelled predictions run:
  ``--model PT --manifest CSV`` (a trained artifact and a cohort manifest with
  labels); skipped when not given.

    python bench/bench_screen.py --out bench/results/screen.json
    python bench/bench_screen.py --sections throughput --batch-sizes 1 4 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ["eager_fp32", "eager_bf16", "onnx_fp32", "onnx_int8_static", "onnx_int8_dynamic"]


def cpu_info() -> dict[str, Any]:
    flags: set[str] = set()
    mhz = None
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return {"model": model, "cores": cores, "mhz": mhz, "isa": isa,
            "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "loadavg_1min": os.getloadavg()[0]}


def fp32_peak(info: dict[str, Any], fma_flops_per_cycle: int | None) -> tuple[float, str]:
    """Peak FP32 FLOP/s = cores x clock x FLOP/cycle/core.

    FLOP/cycle/core = FMA pipes x lanes x 2. Default 32: two 256-bit FMA pipes
    x 8 fp32 lanes x 2 (AMD Zen 2-4, and Zen 4 runs AVX-512 as 2x256 bit);
    Intel server cores with two 512-bit FMA units reach 64 (pass
    ``--flops-per-cycle 64``).
    """
    per_cycle = fma_flops_per_cycle or 32
    ghz = (info["mhz"] or 2000.0) / 1000.0
    peak = info["cores"] * ghz * 1e9 * per_cycle
    text = f"{info['cores']} cores x {ghz:.3f} GHz x {per_cycle} FLOP/cycle = {peak / 1e9:.0f} GFLOP/s"
    return peak, text


def count_flops(arch: str, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bonescreen.models import create_model

    model = create_model(arch, 2).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())


def build_engines(arch: str, size: int, work: Path, engines: list[str], calib_n: int) -> dict[str, Callable]:
    import torch

    from bonescreen.artifact import ModelSpec, load_artifact, save_artifact
    from bonescreen.models import create_model
    from bonescreen.onnx_export import export_onnx, load_onnx, quantize_onnx

    torch.manual_seed(0)
    spec = ModelSpec.for_task(arch, "stage2")
    spec.preprocess["size"] = size
    pt = save_artifact(work / "model.pt", create_model(arch, 2), spec)
    loaded = load_artifact(pt)
    out: dict[str, Callable] = {}
    if "eager_fp32" in engines:
        out["eager_fp32"] = loaded.predict_proba
    if "eager_bf16" in engines:
        def bf16(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.softmax(loaded.model(loaded.to_tensor(x)).float(), 1).numpy()
        out["eager_bf16"] = bf16
    if any(e.startswith("onnx") for e in engines):
        t0 = time.perf_counter()
        onnx_path = export_onnx(loaded, work / "model.onnx")
        print(f"  ONNX export {time.perf_counter() - t0:.0f} s", flush=True)
        if "onnx_fp32" in engines:
            out["onnx_fp32"] = load_onnx(onnx_path).predict_proba
        rng = np.random.default_rng(0)
        if "onnx_int8_static" in engines:
            calib = rng.integers(0, 256, (calib_n, size, size), dtype=np.uint8)
            t0 = time.perf_counter()
            q = quantize_onnx(onnx_path, work / "model.int8s.onnx", mode="static", calibration=calib)
            print(f"  int8 static quantization {time.perf_counter() - t0:.0f} s", flush=True)
            out["onnx_int8_static"] = load_onnx(q).predict_proba
        if "onnx_int8_dynamic" in engines:
            q = quantize_onnx(onnx_path, work / "model.int8d.onnx", mode="dynamic")
            out["onnx_int8_dynamic"] = load_onnx(q).predict_proba
    return out


def section_throughput(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Engines are interleaved within each repeat, so a load spike from another process
    on this shared machine hits every engine alike rather than one engine's whole run."""
    with tempfile.TemporaryDirectory() as tmp:
        engines = build_engines(args.arch, args.size, Path(tmp), args.engines, args.calibration)
        rng = np.random.default_rng(1)
        table: dict[str, dict[str, Any]] = {}
        for bs in args.batch_sizes:
            batch = rng.integers(0, 256, (bs, args.size, args.size), dtype=np.uint8)
            for fn in engines.values():
                fn(batch)  # warm-up (allocations, kernel selection)
            runs: dict[str, list[float]] = {name: [] for name in engines}
            loads = []
            for _ in range(args.repeats):
                for name, fn in engines.items():
                    t0 = time.perf_counter()
                    fn(batch)
                    runs[name].append(time.perf_counter() - t0)
                loads.append(os.getloadavg()[0])
            for name, ts in runs.items():
                med = statistics.median(ts)
                table.setdefault(name, {})[str(bs)] = {"median_s": med, "images_per_s": bs / med, "runs_s": ts,
                                                       "loadavg_1min": loads}
                print(f"  {name:18s} batch {bs}: {bs / med:.2f} img/s (median of {args.repeats}; "
                      f"load {min(loads):.1f}-{max(loads):.1f})", flush=True)
    res["throughput"] = table
    base = table.get("eager_fp32", {})
    speed = {}
    for name, per_bs in table.items():
        speed[name] = {bs: per_bs[bs]["images_per_s"] / base[bs]["images_per_s"] for bs in per_bs if bs in base}
    res["speedup_vs_eager"] = speed
    for name, sp in speed.items():
        print(f"  speed-up vs eager fp32, {name}: " + ", ".join(f"batch {b}: {v:.2f}x" for b, v in sp.items()))


def section_flops(args: argparse.Namespace, res: dict[str, Any]) -> None:
    flops = count_flops(args.arch, args.size)
    peak, text = fp32_peak(res["cpu"], args.flops_per_cycle)
    res["flops"] = {"per_image": flops, "peak_fp32": peak, "peak_arithmetic": text}
    print(f"  {flops / 1e9:.1f} GFLOP per image; peak {text}")
    frac: dict[str, dict[str, float]] = {}
    for name, per_bs in res.get("throughput", {}).items():
        frac[name] = {bs: r["images_per_s"] * flops / peak for bs, r in per_bs.items()}
    res["flops"]["fraction_of_fp32_peak"] = frac


def section_preprocess(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """One core: decode + preprocess of a 2000x2000 12-in-16-bit DICOM (same image as bench_preprocess.py)."""
    code = f"""
import os
os.environ["OMP_NUM_THREADS"] = "1"
import sys, time, statistics, tempfile
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_preprocess import write_variants
from bonescreen.io import read_image
from bonescreen.preprocess import preprocess_array
import cv2; cv2.setNumThreads(1)
with tempfile.TemporaryDirectory() as d:
    p = write_variants(Path(d), ["ExplicitVRLittleEndian"], 2000)["ExplicitVRLittleEndian"]
    def once():
        img, _ = read_image(p); preprocess_array(img, {args.size})
    once()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); once(); ts.append(time.perf_counter() - t0)
    print(1 / statistics.median(ts))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print("  preprocess section failed:", r.stderr[-500:])
        return
    rate = float(r.stdout.strip().splitlines()[-1])
    model_rate = max((v["images_per_s"] for per in res.get("throughput", {}).values() for v in per.values()),
                     default=None)
    res["preprocess"] = {"images_per_s_per_core": rate, "fastest_model_images_per_s": model_rate,
                         "ratio": rate / model_rate if model_rate else None}
    print(f"  decode+preprocess 2000x2000 DICOM: {rate:.1f} img/s per core"
          + (f" = {rate / model_rate:.1f}x the fastest model rate ({model_rate:.2f} img/s)" if model_rate else ""))


MEM_CHILD = r"""
import sys, resource
from bonescreen.screen import ScreenOptions, screen
s = screen([sys.argv[1]], sys.argv[2], sys.argv[3], options=ScreenOptions(batch_size=8, workers=2, progress=False))
print(s.n_screened, s.images_per_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def section_memory(args: argparse.Namespace, res: dict[str, Any]) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.models import create_model

    n_small, n_big = args.memory_counts
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        spec = ModelSpec.for_task("convnext_atto", "stage2")
        spec.preprocess["size"] = 64
        model = save_artifact(d / "m.pt", create_model("convnext_atto", 2), spec)
        rng = np.random.default_rng(0)
        for folder, n in (("small", n_small), ("big", n_big)):
            (d / folder).mkdir()
            for i in range(n):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
                ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
                ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
                ds.Modality, ds.ViewPosition, ds.PatientAge, ds.PatientSex = "CR", "PA", "065Y", "F"
                ds.PatientID = f"P{i}"
                ds.Rows = ds.Columns = 256
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                ds.PixelData = rng.integers(0, 4096, (256, 256), dtype=np.uint16).tobytes()
                ds.save_as(d / folder / f"{i:05d}.dcm", enforce_file_format=True)
            r = subprocess.run([sys.executable, "-c", MEM_CHILD, str(d / folder), str(model), str(d / f"out_{folder}")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print("  memory run failed:", r.stderr[-800:])
                return
            n_done, rate, maxrss_kb = r.stdout.split()[-3:]
            out[str(n)] = {"screened": int(n_done), "images_per_s": float(rate), "peak_rss_mb": int(maxrss_kb) / 1024}
            print(f"  screen over {n} DICOMs: peak RSS {int(maxrss_kb) / 1024:.0f} MB ({float(rate):.0f} img/s)", flush=True)
        del pydicom
    a, b = out[str(n_small)]["peak_rss_mb"], out[str(n_big)]["peak_rss_mb"]
    out["relative_difference"] = (b - a) / a
    res["memory"] = out
    print(f"  peak RSS {n_big} vs {n_small} images: {100 * (b - a) / a:+.1f}%")


def section_accuracy(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """fp32 vs int8 (static, calibrated on the first images) vs bf16 AUC on a labelled manifest."""
    if not (args.model and args.manifest):
        print("  skipped: pass --model (trained artifact) and --manifest (cohort manifest with labels)")
        return
    import csv

    import torch
    from sklearn.metrics import roc_auc_score

    from bonescreen.artifact import load_artifact
    from bonescreen.screen.gate import GatePolicy
    from bonescreen.onnx_export import export_onnx, load_onnx, quantize_onnx
    from bonescreen.screen import InputItem, PrepContext, prepare

    loaded = load_artifact(args.model)
    # the manifest already chose the images; only unreadable/blank ones are dropped here
    pol = GatePolicy.from_eligibility(loaded.spec.eligibility, min_size=min(256, loaded.size), check_scope=False)
    ctx = PrepContext(pol, (loaded.size,), None, False, "")
    imgs, labels = [], []
    base = Path(args.manifest).resolve().parent
    with open(args.manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("label") not in ("0", "1") or (args.split and row.get("split") != args.split):
                continue
            p = Path(row["path"])
            p = p if p.is_absolute() or p.exists() else base / p
            prep = prepare(InputItem(str(p), {k: v for k, v in row.items() if k != "image_id"}), ctx)
            if prep.images is not None:
                imgs.append(prep.images[loaded.size])
                labels.append(int(row["label"]))
    x = np.stack(imgs)
    y = np.array(labels)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(loaded, Path(tmp) / "m.onnx")
        q = quantize_onnx(onnx_path, Path(tmp) / "q.onnx", mode="static", calibration=x[: args.calibration])
        qd = quantize_onnx(onnx_path, Path(tmp) / "qd.onnx", mode="dynamic")
        pos = loaded.spec.positive_class

        def batched(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
            return np.concatenate([fn(x[i : i + 16]) for i in range(0, len(x), 16)])[:, pos]

        def bf16(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.softmax(loaded.model(loaded.to_tensor(b)).float(), 1).numpy()

        scores = {
            "eager_fp32": batched(loaded.predict_proba),
            "onnx_fp32": batched(load_onnx(onnx_path).predict_proba),
            "onnx_int8_static": batched(load_onnx(q).predict_proba),
            "onnx_int8_dynamic": batched(load_onnx(qd).predict_proba),
            "eager_bf16": batched(bf16),
        }
    aucs = {k: float(roc_auc_score(y, v)) for k, v in scores.items()}
    ref = aucs["eager_fp32"]
    res["accuracy"] = {"n": len(y), "prevalence": float(y.mean()), "auc": aucs,
                       "delta_vs_fp32": {k: v - ref for k, v in aucs.items()},
                       "max_abs_score_diff": {k: float(np.abs(v - scores["eager_fp32"]).max()) for k, v in scores.items()}}
    for k, v in aucs.items():
        print(f"  {k:18s} AUC {v:.4f} (delta {v - ref:+.4f}), max |score diff| {res['accuracy']['max_abs_score_diff'][k]:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["throughput", "flops", "preprocess", "memory"],
                    choices=["throughput", "flops", "preprocess", "memory", "accuracy"])
    ap.add_argument("--arch", default="convnext_small")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    # int8 dynamic is left out by default: ConvInteger has no fast CPU kernel (10x slower than fp32 here)
    ap.add_argument("--engines", nargs="+", default=[e for e in ENGINES if e != "onnx_int8_dynamic"],
                    choices=ENGINES)
    ap.add_argument("--calibration", type=int, default=8, help="images for static int8 calibration")
    ap.add_argument("--flops-per-cycle", type=int, help="FP32 FLOP/cycle/core (default 32: 2x256-bit FMA)")
    ap.add_argument("--memory-counts", type=int, nargs=2, default=[200, 2000])
    ap.add_argument("--model", help="trained artifact for the accuracy section")
    ap.add_argument("--manifest", help="cohort manifest with labels for the accuracy section")
    ap.add_argument("--split", help="only rows of this split (accuracy section)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    res: dict[str, Any] = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "args": vars(args)}
    try:
        import onnxruntime

        res["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    res["torch"] = torch.__version__
    print(f"CPU: {res['cpu']}")
    for name in args.sections:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        globals()[f"section_{name}"](args, res)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["peak_rss_mb_bench"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
