"""The cpu-tiny pediatric run on the phantom: measured r, MAE and AUC next to the phantom's oracle.

    python bench/bench_pediatric.py [--work /tmp/bonescreen-bench-pediatric] [--n-dev 300] [--n-ext 150]

Steps (each is also a CLI command, printed as it runs): pediatric phantom
(PED development + PED_EXT external, 128 px) -> cohort (ages 0-17.99) ->
train (preset pediatric-cpu-tiny) -> evaluate. The oracle is computed on the
same test images: the latent (true skeletal Z) against the measured DXA Z.
Results go to bench/results/pediatric.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_set_oracle(preds: pd.DataFrame, truth: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Oracle AUC / r / MAE restricted to the patients scored in ``preds`` (per site and overall)."""
    from sklearn.metrics import roc_auc_score

    t = truth.set_index("patient_id")
    out: dict[str, dict[str, float]] = {}
    groups = [("all", preds), *[(str(s), g) for s, g in preds.groupby("site")]]
    for name, g in groups:
        lat = t.loc[g["patient_id"].astype(str), "latent"].to_numpy(float)
        z = g["z_true"].to_numpy(float)
        y = g["label"].to_numpy(int)
        out[name] = {
            "auc": float(roc_auc_score(y, -lat)) if 0 < y.sum() < len(y) else float("nan"),
            "r": float(np.corrcoef(lat, z)[0, 1]),
            "mae_z": float(np.mean(np.abs(lat - z))),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bonescreen-bench-pediatric"))
    ap.add_argument("--n-dev", type=int, default=300)
    ap.add_argument("--n-ext", type=int, default=150)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="training overrides KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pediatric.json")
    args = ap.parse_args()

    from bonescreen.cli import main as cli

    work = args.work
    timings: dict[str, float] = {}

    def run(step: str, argv: list[str]) -> None:
        print(f"\n$ bonescreen {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli(argv)
        timings[step] = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise SystemExit(f"{step} failed with exit code {rc}")

    from bonescreen.phantom import generate_phantom
    from bonescreen.phantom.pediatric import default_pediatric_sites

    t0 = time.perf_counter()
    print(f"\n# phantom: PED {args.n_dev} + PED_EXT {args.n_ext} children at {args.size} px", flush=True)
    generate_phantom(work / "phantom", sites=default_pediatric_sites(),
                     n_per_site={"PED": args.n_dev, "PED_EXT": args.n_ext}, pool_size=0, size=args.size,
                     seed=0, progress=True)
    timings["phantom"] = round(time.perf_counter() - t0, 1)
    run("cohort", ["pediatric", "cohort", str(work / "phantom"), str(work / "cohort")])
    train_argv = ["pediatric", "train", str(work / "cohort" / "manifest.csv"), "--out", str(work / "run"),
                  "--cache", str(work / "cache"), "--preset", "pediatric-cpu-tiny",
                  "--set", f"image_size={args.size}"]
    for o in args.overrides:
        train_argv += ["--set", o]
    run("train", train_argv)
    run("evaluate", ["pediatric", "evaluate", str(work / "run" / "predictions.csv"),
                     "--tune", str(work / "run" / "tune_predictions.csv"),
                     "--oracle", str(work / "phantom" / "oracle.json"), "--out", str(work / "report"),
                     "--bootstrap", "500", "--no-progress"])

    preds = pd.read_csv(work / "run" / "predictions.csv", dtype={"patient_id": str})
    truth = pd.read_csv(work / "phantom" / "truth_pediatric.csv", dtype={"patient_id": str})
    oracle = test_set_oracle(preds, truth)
    reg = json.loads((work / "report" / "regression.json").read_text())
    cls = json.loads((work / "report" / "classification" / "metrics.json").read_text())
    from bonescreen.evaluate.metrics import auc_point

    rows = []
    for site in ["all", *sorted(preds["site"].astype(str).unique())]:
        g = preds if site == "all" else preds[preds["site"].astype(str) == site]
        t, p = g["z_true"].to_numpy(float), g["z_pred"].to_numpy(float)
        pred_low = p <= -2.0
        y = g["label"].to_numpy(int)
        rows.append({
            "site": site, "n": len(g), "prevalence": round(float(y.mean()), 3),
            "r_z": round(float(np.corrcoef(t, p)[0, 1]), 3),
            "mae_z": round(float(np.mean(np.abs(t - p))), 3),
            "r_bmd": round(float(np.corrcoef(g["bmd_true"], g["bmd_pred"])[0, 1]), 3),
            "auc": round(float(auc_point(y, g["score"].to_numpy(float))), 3),
            "sensitivity": round(float(pred_low[y == 1].mean()), 3) if (y == 1).any() else None,
            "specificity": round(float((~pred_low)[y == 0].mean()), 3) if (y == 0).any() else None,
            "oracle_auc": round(oracle[site]["auc"], 3),
            "oracle_r": round(oracle[site]["r"], 3),
            "oracle_mae_z": round(oracle[site]["mae_z"], 3),
        })
        # the two ingredients of the reported Z, for comparison (test split: never used for any choice)
        for col, key in (("z_pred_head", "head"), ("z_pred_ref", "ref")):
            if col in g.columns:
                q = g[col].to_numpy(float)
                rows[-1][f"r_z_{key}"] = round(float(np.corrcoef(t, q)[0, 1]), 3)
                rows[-1][f"mae_z_{key}"] = round(float(np.mean(np.abs(t - q))), 3)
                rows[-1][f"auc_{key}"] = round(float(auc_point(y, -q)), 3)
    print("\nsite       n   prev   r(Z)  MAE(Z)  r(BMD)   AUC   sens  spec | oracle AUC  r    MAE")
    for r in rows:
        print(f"{r['site']:<8}{r['n']:>4} {r['prevalence']:>6.3f} {r['r_z']:>6.3f} {r['mae_z']:>6.3f} "
              f"{r['r_bmd']:>7.3f} {r['auc']:>6.3f} {r['sensitivity'] or 0:>5.2f} {r['specificity'] or 0:>5.2f} |"
              f" {r['oracle_auc']:>6.3f} {r['oracle_r']:>6.3f} {r['oracle_mae_z']:>5.3f}")
    card = json.loads((work / "run" / "model_card.json").read_text())
    print(f"reported Z from: {card.get('z_from')} (tuning: {card.get('z_from_selection')}); "
          f"best epoch {card.get('best_epoch')}")
    for r in rows:
        if "r_z_head" in r:
            print(f"  {r['site']:<8} head r {r['r_z_head']:.3f} MAE {r['mae_z_head']:.3f} AUC {r['auc_head']:.3f}"
                  + (f" | reference r {r['r_z_ref']:.3f} MAE {r['mae_z_ref']:.3f} AUC {r['auc_ref']:.3f}"
                     if "r_z_ref" in r else ""))
    result = {
        "command": "python bench/bench_pediatric.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "regression": {k: v for k, v in reg.items() if k in ("z", "bmd")},
        "classification_inputs": cls.get("inputs"),
        "residual_sd_z": card.get("residual_sd_z"),
        "z_from": card.get("z_from"),
        "z_from_selection_tune": card.get("z_from_selection"),
        "model_selection": card.get("model_selection"),
        "best_epoch": card.get("best_epoch"),
        "z_reference_fit": card.get("z_reference_fit"),
        "epochs_run": card.get("epochs_run"),
        "arch": card.get("arch"),
        "pretrained": card.get("pretrained"),
        "timings_s": timings,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
