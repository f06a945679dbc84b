"""Scale benchmarks: ``screen`` vs ``screen --engine ray``, the backends side by side, their AUC.

Sections (``--sections``; default all three):

- ``engines``: images/s of single-process ``bonescreen screen`` and of ``--engine ray`` with
  1 and 2 predict actors over one phantom folder, each a fresh ``bonescreen screen`` process
  (Ray start-up included, as a user sees it), the max |score difference| of each Ray run
  against the single-process one, and the peak summed RSS of the process tree (the driver
  and, for Ray, its raylet, GCS and worker processes; sampled every 0.2 s from /proc; shared
  pages such as Ray's object store count once per process that maps them, so this
  overstates Ray's real footprint).
- ``backends``: every CPU backend of the registry (``bonescreen.screen.models.BACKENDS``)
  on one convnext_small artifact at 512 px (random weights: speed does not depend on the
  values), timed by ``bonescreen.screen.auto.probe`` in this one process (interleaved, a
  warm-up call each, the median of ``--repeats`` calls, batch ``--batch``), plus what
  ``--backend auto`` (``choose_backend``, a fresh cache) picks here with and without
  calibration images. The int8 backends calibrate on preprocessed synthetic radiographs.
- ``accuracy``: AUC of every backend on the external sites of a phantom the model never
  trained on (``--model`` a trained .pt, ``--manifest`` the cohort manifest with labels,
  ``--oracle`` the phantom's oracle.json), next to the oracle AUC and as a fraction of the
  headroom ``(AUC - 0.5) / (oracle - 0.5)``; int8 calibrates on ``--calibration-split``
  images (training images, as ``--calibration`` in ``screen``).

The CPU's instruction set and the 1-minute load average are recorded with every section
(the machine may be shared: figures from a loaded machine are slower than its capacity).

    python bench/bench_scale.py --sections engines --folder PHANTOM_SITE_DIR --model student.pt
    python bench/bench_scale.py --sections backends --repeats 3
    python bench/bench_scale.py --sections accuracy --model student.pt --manifest cohort/manifest.csv \\
        --oracle phantom/oracle.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def machine_facts() -> dict[str, Any]:
    from bonescreen.screen.auto import read_machine

    m = read_machine()
    avx512 = sorted(f for f in m.flags if f.startswith(("avx512", "amx")))
    return {"cpu": m.model, "cores": m.cores, "isa": m.isa, "avx512_amx_flags": avx512,
            "loadavg": list(os.getloadavg()), "gpu": _gpu()}


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no GPU on this machine)"


# ------------------------------------------------------------------ process-tree memory


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and every descendant, from /proc."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(return code, wall seconds, peak summed RSS in MB, stderr tail) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    return proc.returncode, time.perf_counter() - t0, peak[0] / 2**20, err[-2000:]


def _scores(out: Path) -> dict[str, float | None]:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {r["path"]: r.get("score") for r in rows}


def section_engines(args: argparse.Namespace, res: dict[str, Any]) -> None:
    if not args.folder or not args.model:
        print("engines: needs --folder and --model")
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BONESCREEN_CACHE_DIR": tempfile.mkdtemp()}
    n_files = sum(1 for p in Path(args.folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    out: dict[str, Any] = {"folder": str(args.folder), "files": n_files, "model": str(args.model),
                           "backend": args.backend, "ood": args.ood, "batch_size": args.batch, "machine": machine_facts(), "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    base = [sys.executable, "-m", "bonescreen.cli", "screen", str(args.folder), "--model", str(args.model),
            "--backend", args.backend, "--ood", args.ood, "--device", "cpu", "--batch-size", str(args.batch), "--no-progress",
            "--pseudonym-key-file", str(work / "key")]
    configs = {"single-process": [], "ray, 1 worker": ["--engine", "ray", "--ray-workers", "1"],
               "ray, 2 workers": ["--engine", "ray", "--ray-workers", "2"]}
    ref: dict[str, float | None] | None = None
    for name, extra in configs.items():
        dest = work / name.replace(" ", "").replace(",", "-")
        load = os.getloadavg()[0]
        rc, wall, peak, err = run_measured([*base, "--out", str(dest), *extra], env)
        if rc != 0:
            print(f"  {name}: failed (rc {rc}): {err}")
            out["runs"][name] = {"error": err}
            continue
        summ = json.loads((dest / "summary.json").read_text())
        scores = _scores(dest)
        if ref is None:
            ref = scores
        diffs = [abs(a - ref[p]) for p, a in scores.items()  # type: ignore[operator]
                 if a is not None and ref.get(p) is not None]
        same_rows = set(scores) == set(ref) and all((scores[p] is None) == (ref[p] is None) for p in ref)
        out["runs"][name] = {
            "rows": summ["n_rows"], "screened": summ["n_screened"], "images_per_s": summ["images_per_s"],
            "wall_s": round(wall, 1), "images_per_s_wall": round(summ["n_rows"] / wall, 3),
            "peak_tree_rss_mb": round(peak), "max_abs_score_diff_vs_single": max(diffs) if diffs else None,
            "same_rows_as_single": same_rows, "loadavg_1min_at_start": load,
        }
        print(f"  {name:16s} {summ['n_rows']} rows, {summ['images_per_s']:.2f} img/s in the loop, "
              f"{summ['n_rows'] / wall:.2f} img/s wall ({wall:.0f} s), peak tree RSS {peak:.0f} MB, "
              f"max |Δscore| {out['runs'][name]['max_abs_score_diff_vs_single']}, load {load:.1f}", flush=True)
    res["engines"] = out


# ------------------------------------------------------------------ backends side by side


def _artifact(work: Path, arch: str, size: int) -> Path:
    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.models import create_model

    spec = ModelSpec.for_task(arch, "stage2")
    spec.preprocess["size"] = size
    import torch

    torch.manual_seed(0)
    return Path(save_artifact(work / f"{arch}_{size}.pt", create_model(arch, 2), spec))


def _synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    sys.path.insert(0, str(ROOT / "tests"))
    from _screen_helpers import radiograph

    from bonescreen.preprocess import preprocess_array

    return np.stack([preprocess_array(radiograph(seed + i, (1024, 1024)).astype(np.float32), size) for i in range(n)])


def section_backends(args: argparse.Namespace, res: dict[str, Any]) -> None:
    from bonescreen.artifact import load_artifact
    from bonescreen.screen.auto import choose_backend, probe
    from bonescreen.screen.backends import PRECISION
    from bonescreen.screen.models import BACKENDS, BackendContext, model_id

    work = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    path = _artifact(work, args.arch, args.size)
    loaded = load_artifact(path)
    images = _synthetic_images(args.batch, args.size, 0)
    calib = _synthetic_images(args.calibration, args.size, 100)
    names = [n for n in BACKENDS if n in args.backends] if args.backends else list(BACKENDS)
    built: dict[str, Any] = {}
    build_s: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        ctx = BackendContext(path, model_id(path), args.threads, work / "cache",
                             calibration=calib if PRECISION[name] == "int8" else None)
        try:
            built[name] = BACKENDS[name](loaded, ctx)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"  {name}: not built ({failed[name][:200]})")
            continue
        build_s[name] = round(time.perf_counter() - t0, 1)
        print(f"  built {name} in {build_s[name]} s", flush=True)
    load0 = os.getloadavg()[0]
    _, per_image, rejected = probe(built, PRECISION, images, repeats=args.repeats,
                                   positive=int(loaded.spec.positive_class))
    load1 = os.getloadavg()[0]
    ref_p = loaded.predict_proba(images)
    rows = {}
    for name, s in per_image.items():
        p = built[name].predict_proba(images)
        rows[name] = {"precision": PRECISION[name], "images_per_s": round(1 / s, 3),
                      "speedup_vs_eager": round(per_image["torch"] / s, 3),
                      "max_abs_prob_diff_vs_eager": float(np.abs(p - ref_p).max()), "build_s": build_s[name]}
        print(f"  {name:26s} {PRECISION[name]:5s} {1 / s:6.3f} img/s  {per_image['torch'] / s:5.2f}x eager  "
              f"max|Δp| {rows[name]['max_abs_prob_diff_vs_eager']:.2e}", flush=True)
    for name, why in rejected.items():
        rows[name] = {"precision": PRECISION[name], "rejected": why}
        print(f"  {name}: rejected by the parity check: {why}")
    del built
    auto: dict[str, Any] = {}
    for label, cal in (("without --calibration", None), ("with --calibration", calib)):
        t0 = time.perf_counter()
        c = choose_backend(path, threads=args.threads, cache_dir=work / "cache", device="cpu", calibration=cal,
                           batch_size=args.batch, cache=work / f"choice-{len(auto)}.json")
        auto[label] = {**c.as_dict(), "probe_s": round(time.perf_counter() - t0, 1)}
        print(f"  auto {label}: {c.backend} ({c.reason})", flush=True)
    res["backends"] = {"arch": args.arch, "size": args.size, "batch": args.batch, "repeats": args.repeats,
                       "threads": args.threads, "machine": machine_facts(), "loadavg_1min_before_after": [load0, load1],
                       "results": rows, "not_built": failed, "auto": auto}


# ------------------------------------------------------------------ accuracy


def section_accuracy(args: argparse.Namespace, res: dict[str, Any]) -> None:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from bonescreen.artifact import load_artifact
    from bonescreen.screen.backends import PRECISION
    from bonescreen.screen.loading import calibration_images
    from bonescreen.screen.engine import PrepContext, prepare
    from bonescreen.screen.gate import GatePolicy
    from bonescreen.screen.inputs import InputItem
    from bonescreen.screen.models import BACKENDS, BackendContext, model_id

    if not (args.model and args.manifest and args.oracle):
        print("accuracy: needs --model, --manifest and --oracle")
        return
    path = Path(args.model)
    loaded = load_artifact(path)
    size = int(loaded.size)
    man = pd.read_csv(args.manifest)
    base = Path(args.manifest).parent
    oracle = json.loads(Path(args.oracle).read_text())
    label_col = args.label_column
    calib_rows = man[man["split"] == args.calibration_split] if "split" in man else man
    calib_paths = [str((base / p) if not Path(p).is_absolute() else p) for p in calib_rows["path"].head(64)]
    calib = calibration_images(calib_paths, loaded)
    pol = GatePolicy.from_eligibility(loaded.spec.eligibility, min_size=min(256, size))
    ctx = PrepContext(pol, (size,), None, False, None)
    work = Path(tempfile.mkdtemp(prefix="bench-acc-"))
    names = [n for n in BACKENDS if n in args.backends] if args.backends else list(BACKENDS)
    preds = {}
    for name in names:
        try:
            preds[name] = BACKENDS[name](loaded, BackendContext(path, model_id(path), args.threads, work,
                                                                calibration=calib if PRECISION[name] == "int8" else None))
        except Exception as exc:
            print(f"  {name}: not built ({type(exc).__name__}: {exc})")
    pos = int(loaded.spec.positive_class)
    out: dict[str, Any] = {"model": model_id(path), "machine": machine_facts(), "sites": {}}
    for site in args.sites:
        rows = man[(man["site"] == site) & man[label_col].notna()]
        imgs, ys = [], []
        for _, r in rows.iterrows():
            p = str(base / r["path"]) if not Path(str(r["path"])).is_absolute() else str(r["path"])
            prep = prepare(InputItem(p), ctx)
            if prep.images is not None:
                imgs.append(prep.images[size])
                ys.append(int(r[label_col]))
        if len(set(ys)) < 2:
            print(f"  {site}: fewer than two classes; skipped")
            continue
        x, y = np.stack(imgs), np.array(ys)
        orc = float(oracle[site]["auc"])
        ref_scores = None
        site_out: dict[str, Any] = {"n": len(y), "oracle_auc": orc, "backends": {}}
        for name, pred in preds.items():
            s = np.concatenate([pred.predict_proba(x[i:i + 16]) for i in range(0, len(x), 16)])[:, pos]
            auc = float(roc_auc_score(y, s))
            if name == "torch":
                ref_scores, ref_auc = s, auc
            site_out["backends"][name] = {"precision": PRECISION[name], "auc": round(auc, 4),
                                          "headroom": round((auc - 0.5) / (orc - 0.5), 3)}
        for name, d in site_out["backends"].items():
            s = np.concatenate([preds[name].predict_proba(x[i:i + 16]) for i in range(0, len(x), 16)])[:, pos]
            d["delta_auc_vs_eager"] = round(d["auc"] - ref_auc, 4)
            d["max_abs_score_diff"] = float(np.abs(s - ref_scores).max())  # type: ignore[operator]
            print(f"  {site} n={len(y)} oracle {orc:.3f}: {name:26s} AUC {d['auc']:.4f} "
                  f"(Δ {d['delta_auc_vs_eager']:+.4f}, headroom {d['headroom']:.3f}, max|Δs| {d['max_abs_score_diff']:.1e})",
                  flush=True)
        out["sites"][site] = site_out
    res["accuracy"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["engines", "backends", "accuracy"],
                    choices=["engines", "backends", "accuracy"])
    ap.add_argument("--folder", help="engines: a phantom folder (or site folder) to screen")
    ap.add_argument("--model", help="engines/accuracy: a trained .pt artifact")
    ap.add_argument("--backend", default="torch", help="engines: --backend of the screen runs")
    ap.add_argument("--ood", default="refuse", help="engines: --ood of the screen runs (off for a v1 artifact)")
    ap.add_argument("--arch", default="convnext_small")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calibration", type=int, default=16, help="backends: synthetic int8 calibration images")
    ap.add_argument("--backends", nargs="+", help="only these registry backends")
    ap.add_argument("--manifest", help="accuracy: cohort manifest with labels")
    ap.add_argument("--oracle", help="accuracy: the phantom's oracle.json")
    ap.add_argument("--sites", nargs="+", default=["EXT_A", "EXT_B"])
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--calibration-split", default="train")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    res: dict[str, Any] = {}
    for sec in args.sections:
        print(f"[{sec}]", flush=True)
        {"engines": section_engines, "backends": section_backends, "accuracy": section_accuracy}[sec](args, res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
