"""Training benchmarks: throughput of a preset, and the whole recipe on a phantom.

    python bench/bench_train.py throughput --preset cpu-tiny --repeats 5
    python bench/bench_train.py recipe --phantom runs/bench-phantom   # teacher -> pseudolabel -> student

``throughput`` times optimizer steps (data pipeline included: augmentation,
normalisation, forward, backward, AdamW) on in-memory images at the preset's
size, with weak and with strong augmentation, and reports the median of the
repeats in images/s. ``recipe`` generates (or reuses) a phantom, builds the
cohort, trains the teacher, pseudo-labels the pool, distils the student and
scores the DEV test split and every external site next to the phantom's
oracle AUC. Results go to ``bench/results/`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def throughput(preset: str, repeats: int, steps: int, overrides: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from bonescreen.config import load_config
    from bonescreen.data import ImageSource, ManifestDataset
    from bonescreen.distributed import resolve_device
    from bonescreen.training.inference import autocast
    from bonescreen.training.model import build_model

    cfg = load_config(preset, {"progress": False, **overrides})
    device = resolve_device(cfg.device)
    n = cfg.batch_size * (steps + 2)
    rng = np.random.default_rng(0)
    source = ImageSource([str(i) for i in range(n)], cfg.image_size)
    source.array = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size), dtype=np.uint8)
    labels = rng.integers(0, 2, n)
    out: dict = {"preset": preset, "arch": cfg.arch, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                 "device": str(device), "num_workers": cfg.num_workers, "steps": steps, "repeats": repeats}
    for level in ("weak", "strong"):
        ds = ManifestDataset(source, labels, augment=level, strong_p=cfg.strong_p, seed=0)
        rates = []
        for r in range(repeats):
            torch.manual_seed(r)
            model, _ = build_model(cfg, 2)
            model.to(device).train()
            if device.type == "cuda" and cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                drop_last=True, pin_memory=device.type == "cuda")
            seen, t0 = 0, None
            for i, batch in enumerate(loader):
                if i == 2:  # two warm-up steps (allocator, cudnn autotune, worker start)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0, seen = time.perf_counter(), 0
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                with autocast(device, cfg):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(seen / (time.perf_counter() - t0))
        # Augmentation alone, single process: the CPU cost of the data pipeline.
        t0 = time.perf_counter()
        for i in range(min(n, 200)):
            ds[i]
        aug_rate = min(n, 200) / (time.perf_counter() - t0)
        out[level] = {"images_per_s_median": statistics.median(rates), "images_per_s_all": rates,
                      "augment_only_images_per_s": aug_rate}
    return out


def recipe(phantom: Path, preset: str, overrides: dict, n_dev: int, n_ext: int, pool: int, render: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from bonescreen.cohort import CohortConfig, build_cohort, sites_from_phantom
    from bonescreen.config import load_config
    from bonescreen.training.distill import distill
    from bonescreen.phantom import generate_phantom
    from bonescreen.preprocess import preprocess_files
    from bonescreen.pseudolabel import pseudolabel
    from bonescreen.training.inference import predict_manifest
    from bonescreen.training.jobs import train_model

    cfg = load_config(preset, {"progress": False, **overrides})
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        print(f"{name}: {timings[name]} s", flush=True)

    ph = phantom / "phantom"
    if not (ph / "oracle.json").is_file():
        generate_phantom(ph, n_per_site={"DEV": n_dev, "EXT_A": n_ext, "EXT_B": n_ext, "EXT_C": n_ext},
                         pool_size=pool, size=render, seed=0, workers=os.cpu_count() or 1, progress=False)
    lap("phantom")
    cohort = build_cohort(sites_from_phantom(ph), CohortConfig(seed=0), workers=os.cpu_count() or 1, progress=False)
    paths = cohort.write(phantom / "cohort")
    manifest = cohort.manifest
    cache = phantom / "cache"
    pool_files = sorted(str(p) for p in (ph / "pool" / "images").glob("*.dcm"))
    preprocess_files([*manifest["path"].tolist(), *pool_files], cache, size=cfg.image_size,
                     workers=os.cpu_count() or 1, progress=False)
    lap("cohort+preprocess")
    runs = phantom / f"runs-{preset}"
    teacher = train_model(paths["manifest"], runs / "teacher", cfg, cache_root=cache)
    lap("teacher")
    proxy = pseudolabel(teacher.artifact_path, pool_files, runs / "proxy.csv",
                        thresholds=(cfg.threshold_normal, cfg.threshold_low), cache_root=cache, progress=False)
    lap("pseudolabel")
    student = distill(paths["manifest"], runs / "student", cfg, teacher=teacher.artifact_path,
                      cache_root=cache, proxy=proxy.out_csv)
    lap("student")
    oracle = json.loads((ph / "oracle.json").read_text())
    evalset = manifest[(manifest["site"] != "DEV") | (manifest["split"] == "test")]
    sites: dict[str, dict] = {}
    for name, res in (("teacher", teacher), ("student", student)):
        preds = predict_manifest(res.artifact_path, evalset, cache, model_name=name, progress=False)
        for site, g in preds.groupby("site"):
            auc = float(roc_auc_score(g["label"], g["score"]))
            row = sites.setdefault(site, {"n": len(g), "oracle_auc": oracle[site]["auc"]})
            row[f"{name}_auc"] = round(auc, 4)
    lap("predict")
    for site, row in sites.items():
        row["target_auc"] = round(0.5 + 0.85 * (row["oracle_auc"] - 0.5), 4)
        row["student_meets_target"] = row["student_auc"] >= row["target_auc"]
    return {
        "preset": preset, "overrides": overrides, "timings_s": timings,
        "pseudolabel": proxy.counts, "teacher_best_epoch": teacher.best_epoch,
        "student_best_epoch": student.best_epoch,
        "teacher_history": teacher.history, "student_history": student.history, "sites": sites,
    }


def main(argv: list[str] | None = None) -> int:
    from bonescreen.config import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--preset", default="cpu-tiny")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--steps", type=int, default=6)
    a.add_argument("--set", dest="overrides", action="append", default=[])
    b = sub.add_parser("recipe")
    b.add_argument("--phantom", type=Path, default=Path("runs/bench-phantom"))
    b.add_argument("--preset", default="cpu-tiny")
    b.add_argument("--n-dev", type=int, default=700)
    b.add_argument("--n-ext", type=int, default=180)
    b.add_argument("--pool", type=int, default=600)
    b.add_argument("--render-size", type=int, default=256)
    b.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.overrides)
    start = time.perf_counter()
    if args.what == "throughput":
        result = throughput(args.preset, args.repeats, args.steps, overrides)
    else:
        result = recipe(args.phantom, args.preset, overrides, args.n_dev, args.n_ext, args.pool, args.render_size)
    result["machine"] = machine()
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["command"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"train_{args.what}_{args.preset}.json"
    dest.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("history")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
