"""Trust at a new site, measured: before, after label-free adaptation, after `calibrate` with N local pairs.

    python bench/bench_adapt.py --demo /tmp/adapt-demo [--work /tmp/adapt-bench] [--pairs 200] [--repeats 20]

Needs a finished demo run (``bonescreen demo --out DIR``: its student, cohort, phantom and cache).
Evaluates the demo's student on sites it never trained on: the demo's external sites (EXT_A,
EXT_B, EXT_C) and a far site (the vendor look farthest from the development site's) generated
here with the demo's seed and render size (``bonescreen.phantom.far_site`` when the phantom has
it, else the fallback spec below). For each site:

- before: AUC next to the oracle AUC and the headroom fraction, sensitivity/specificity at the
  artifact's cut-off, calibration slope/intercept/ECE, true prevalence;
- label-free (no label seen): EM prevalence only; BatchNorm re-estimation + EM; feature alignment
  (to the development site's train-split features) + EM; the grey scale matched to the development
  site's tune-split histogram (alone, and then BatchNorm: `adapt --home`'s default with a home profile
  made by `calibrate --adapt intensity_batchnorm`) + EM: estimated vs true prevalence, AUC,
  sensitivity/specificity at the moved cut-off, calibration of the prior-adjusted probabilities;
- calibrate with N local pairs (random patient-grouped draws, repeated): sensitivity/specificity
  on the rest of that site at the requested operating point, calibration slope/intercept/ECE on
  the rest; for the base model and on top of the label-free adaptation.

Results: bench/results/adapt.json (and a markdown table printed for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def fallback_far_site(n: int) -> Any:
    """An unseen vendor far from DEV's (used only when the phantom has no ``far_site``)."""
    from bonescreen.phantom import SiteSpec, VendorProfile

    vendor = VendorProfile(
        name="far_cr_fallback", manufacturer="Distant Medical", model="DM-CR 10", modality="CR",
        bits_stored=10, photometric="MONOCHROME1", response="linear", linear_k=0.9, exposure=0.45,
        electronic_noise=0.006, scatter=0.15, blur_mm=0.8, detail_gain=2.6, range_compression=0.45,
        fov_mm=370.0, collimation=0.1, collimation_fill="black", marker="both",
    )
    return SiteSpec(name="FAR", n_patients=n, age_mean=70.0, age_sd=9.0, age_min=50.0, age_max=95.0,
                    female_frac=0.5, prevalence=0.45, vendors=(vendor,), ap_frac=0.2, lateral_frac=0.2,
                    date_start="2020-01-01", date_end="2024-12-31", dxa_device="Hologic Horizon")


def far_phantom(demo: Path, work: Path, n: int, log: list[str], which: str = "FAR") -> tuple[Path, str]:
    """``FAR``: the phantom's own far site (``far_site()``) when it has one; ``FAR_B``: the spec above."""
    from bonescreen import phantom as ph
    from bonescreen.phantom import generate_phantom

    meta = json.loads((demo / "phantom" / "phantom.json").read_text())
    size, seed = int(meta.get("size", 256)), int(meta.get("seed", 0))
    if which == "FAR" and getattr(ph, "far_site", None) is not None:
        spec, origin, out = ph.far_site(), "bonescreen.phantom.far_site()", work / "far-phantom"
    else:
        spec, origin = fallback_far_site(n), "bench's own far vendor (FAR_B, fallback_far_site)"
        out = work / "far-phantom-fallback"
    if not (out / "oracle.json").is_file():
        t0 = time.perf_counter()
        generate_phantom(out, sites=[spec], n_per_site={spec.name: n}, pool_size=0, size=size, seed=seed,
                         workers=2, progress=False)
        log.append(f"far phantom: {n} patients at {size} px in {time.perf_counter() - t0:.0f} s ({origin})")
    return out, origin


def site_frame(phantom_dir: Path, name: str, work: Path) -> pd.DataFrame:
    from bonescreen.cohort import CohortConfig, SiteInput, build_cohort

    cohort = build_cohort([SiteInput(name, [phantom_dir / name / "images"], phantom_dir / name / "dxa.csv",
                                     role="external")], CohortConfig(seed=0), workers=2, progress=False)
    return cohort.manifest


def images_of(frame: pd.DataFrame, cache: Path, size: int) -> tuple[pd.DataFrame, np.ndarray]:
    from bonescreen.data import prepare_images

    prep = prepare_images(frame, cache, size, preload="false", workers=2, progress=False)
    return prep.frame.reset_index(drop=True), prep.source.batch(np.arange(len(prep.source)))


def headroom(auc: float, oracle: float) -> float:
    return (auc - 0.5) / (oracle - 0.5)


def rates(y: np.ndarray, decision: np.ndarray) -> dict[str, float]:
    d = decision.astype(bool)
    return {"sensitivity": float(d[y == 1].mean()), "specificity": float((~d[y == 0]).mean()),
            "flagged": int(d.sum())}


def calib(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from bonescreen.evaluate.metrics import calibration_slope_intercept, expected_calibration_error

    c = calibration_slope_intercept(y, p)
    return {"slope": c.slope.value, "intercept": c.intercept.value, "ece": expected_calibration_error(y, p)}


LABEL_FREE = (
    # key, label, adaptation, home profile, cut-off rule
    ("em_raw", "EM on the raw scores, P >= 0.5", "none", None, "probability"),
    ("bn_keep", "BatchNorm re-estimated, cut-off kept", "batchnorm", None, "keep"),
    ("home_em", "home calibration + EM, P >= 0.5 (no adaptation)", "none", "home0", "probability"),
    ("bn_home_em", "BatchNorm + home calibration + EM, P >= 0.5", "batchnorm", "home_bn", "probability"),
    ("bn_home_cut", "BatchNorm + the home cut-off (sensitivity 0.90 at home)", "batchnorm", "home_bn", "home"),
    ("fa_keep", "feature alignment, cut-off kept", "feature_align", None, "keep"),
    ("int_home_em", "grey scale matched + home calibration + EM, P >= 0.5", "intensity", "home_int", "probability"),
    ("ibn_home_em", "grey scale matched + BatchNorm + home calibration + EM, P >= 0.5 (the default)",
     "intensity_batchnorm", "home_ibn", "probability"),
    ("ibn_home_cut", "grey scale matched + BatchNorm + the home cut-off", "intensity_batchnorm", "home_ibn", "home"),
)
#: the label-free row of the README's story table: what `adapt --home HOME` does by default
DEFAULT_LABEL_FREE = "ibn_home_em"


def label_free(loaded: Any, y: np.ndarray, oracle: float, base: np.ndarray, adapted: dict[str, tuple[Any, np.ndarray]],
               homes: dict[str, Any], seed: int) -> dict[str, Any]:
    from bonescreen.adapt.labelfree import LabelFreeConfig, label_free_profile
    from bonescreen.evaluate.metrics import auc_point

    out: dict[str, Any] = {}
    for key, label, method, home, rule in LABEL_FREE:
        adaptation, s = adapted[method]
        oc = label_free_profile(loaded, name="bench", base_scores=base, scores=s, adaptation=adaptation,
                                config=LabelFreeConfig(rule=rule, seed=seed), home=homes.get(home) if home else None)
        prof, r = oc.profile, oc.report
        auc = auc_point(y, s)
        out[key] = {
            "label": label, "method": method, "home": home, "rule": rule,
            "prevalence_estimate": r["prevalence"]["value"], "prevalence_ci": [r["prevalence"]["lo"], r["prevalence"]["hi"]],
            "prevalence_true": float(y.mean()), "threshold": prof.threshold, "auc": auc, "headroom": headroom(auc, oracle),
            **rates(y, s >= prof.threshold), **calib(y, prof.probability(s)), "expected_at_cut": r["expected_at_cut"],
            "adaptation": r["adaptation"],
        }
    return out


def home_profiles(loaded: Any, manifest: pd.DataFrame, cache: Path, target: float, seed: int) -> dict[str, Any]:
    """Calibrated profiles of the development site's tune split, one per adaptation (as `calibrate --adapt`)."""
    from bonescreen.adapt.calibrate import CalibrateConfig, LocalPairs, calibrate_pairs, manifest_images, select_manifest
    from bonescreen.adapt.labelfree import score_images
    from bonescreen.adapt.tta import adapted_model, fit_home_adaptation
    from bonescreen.artifact import weights_fingerprint

    tune = select_manifest(manifest, loaded.spec.task, site="DEV", split="tune")
    imgs = manifest_images(tune, cache, loaded.size)
    y = tune["label"].astype(int).to_numpy()
    cfg = CalibrateConfig(target="sensitivity", target_value=target, learning_curve=(), seed=seed)
    fp = weights_fingerprint(loaded.model)
    out = {}
    for key, ad in (("home0", None), ("home_bn", fit_home_adaptation(loaded, imgs, "batchnorm")),
                    ("home_int", fit_home_adaptation(loaded, imgs, "intensity")),
                    ("home_ibn", fit_home_adaptation(loaded, imgs, "intensity_batchnorm"))):
        s = score_images(adapted_model(loaded, ad), imgs)
        out[key] = calibrate_pairs(LocalPairs(y, s), name=key.upper(), fingerprint=fp, task=loaded.spec.task,
                                   base_threshold=float(loaded.spec.threshold), config=cfg, adaptation=ad).profile
    return out


def calibrate_draws(y: np.ndarray, s: np.ndarray, groups: np.ndarray, n_pairs: int, repeats: int, seed: int,
                    target: str, value: float) -> dict[str, Any]:
    from bonescreen.adapt.calibrate import CalibrateConfig, LocalPairs, calibrate_pairs, patient_split

    cfg = CalibrateConfig(target=target, target_value=value, learning_curve=(), seed=seed)
    pairs = LocalPairs(y, s, groups)
    rng = np.random.default_rng(seed)
    rows = []
    tries = 0
    while len(rows) < repeats and tries < 20 * repeats:
        tries += 1
        drawn = patient_split(pairs, n_pairs, rng)
        if drawn is None:
            continue
        fit, rest = drawn
        oc = calibrate_pairs(pairs.subset(fit), name="bench", fingerprint="sha256:bench", task="stage2",
                             base_threshold=0.5, config=cfg)
        prof = oc.profile
        yr, sr = y[rest], s[rest]
        rows.append({**rates(yr, sr >= prof.threshold), **calib(yr, prof.probability(sr)),
                     "method": prof.recalibration.method, "n_rest": int(rest.size)})
    df = pd.DataFrame(rows)
    summary: dict[str, Any] = {"n_pairs": n_pairs, "repeats": repeats, "target": target, "value": value,
                               "n_rest_median": int(df["n_rest"].median()),
                               "methods": df["method"].value_counts().to_dict()}
    for k in ("sensitivity", "specificity", "slope", "intercept", "ece"):
        summary[k] = {"median": float(df[k].median()), "p10": float(df[k].quantile(0.1)),
                      "p90": float(df[k].quantile(0.9))}
    summary[f"{target}_within_0.05"] = float((np.abs(df[target] - value) <= 0.05).mean())
    summary["slope_in_0.8_1.2"] = float(((df["slope"] >= 0.8) & (df["slope"] <= 1.2)).mean())
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("/tmp/adapt-demo"))
    ap.add_argument("--model", type=Path, help="default: DEMO/student/model.pt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapt-bench"))
    ap.add_argument("--n-far", type=int, default=440)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--target-sensitivity", type=float, default=0.90)
    ap.add_argument("--target-specificity", type=float, default=0.90)
    ap.add_argument("--sites", default="FAR,FAR_B,EXT_A,EXT_B,EXT_C,DEV",
                    help="FAR: the phantom's far site; FAR_B: this bench's own far vendor; DEV: its test split (a control)")
    ap.add_argument("--append", action="store_true", help="add these sites to the results already in --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapt.json")
    args = ap.parse_args()

    import torch

    from bonescreen.adapt.labelfree import fit_adaptation
    from bonescreen.adapt.tta import feature_statistics
    from bonescreen.artifact import load_artifact
    from bonescreen.evaluate.metrics import auc_point

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    log: list[str] = []
    demo, work = args.demo, args.work
    work.mkdir(parents=True, exist_ok=True)
    model_path = args.model or demo / "student" / "model.pt"
    loaded = load_artifact(model_path)
    size = loaded.size
    cache = demo / "cache"
    manifest = pd.read_csv(demo / "cohort" / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    oracle_demo = json.loads((demo / "phantom" / "oracle.json").read_text())

    # development data's features (the train split), for feature alignment
    dev = manifest[(manifest["site"] == "DEV") & (manifest["split"] == "train")]
    dev = dev[pd.to_numeric(dev["label"], errors="coerce").notna()]
    _, dev_imgs = images_of(dev, cache, size)
    source = feature_statistics(loaded, dev_imgs)
    del dev_imgs
    homes = home_profiles(loaded, manifest, cache, args.target_sensitivity, args.seed)
    log.append("home profiles (DEV tune split): " + "; ".join(
        f"{k}: n {h.data['n']}, prevalence {h.prevalence['value']:.3f}, {h.recalibration.method} "
        f"{h.recalibration.params}, cut-off {h.threshold:.4f}" for k, h in homes.items()))

    results: dict[str, Any] = {}
    if args.append and args.out.is_file():
        results = json.loads(args.out.read_text())["sites"]
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    for site in sites:
        if site in ("FAR", "FAR_B"):
            far_dir, origin = far_phantom(demo, work, args.n_far, log, site)
            frame = site_frame(far_dir, "FAR", work)
            oracle = json.loads((far_dir / "oracle.json").read_text())["FAR"]["auc"]
            site_cache = work / "cache"
        elif site == "DEV":  # control: the development site's own held-out test split
            frame = manifest[(manifest["site"] == "DEV") & (manifest["split"] == "test")]
            oracle = oracle_demo[site]["auc"]
            origin = "demo phantom, development site test split (control, not an unseen site)"
            site_cache = cache
        else:
            frame = manifest[manifest["site"] == site]
            oracle = oracle_demo[site]["auc"]
            origin = "demo phantom"
            site_cache = cache
        frame = frame[pd.to_numeric(frame["label"], errors="coerce").notna()]
        frame, imgs = images_of(frame, site_cache, size)
        y = frame["label"].astype(int).to_numpy()
        groups = frame["patient_id"].astype(str).to_numpy()
        s0 = np.concatenate([loaded.score(imgs[i:i + 64]) for i in range(0, len(imgs), 64)])
        auc0 = auc_point(y, s0)
        t0 = float(loaded.spec.threshold)
        entry: dict[str, Any] = {
            "origin": origin, "n_images": int(len(y)), "n_patients": int(len(set(groups))),
            "prevalence": float(y.mean()), "oracle_auc": oracle,
            "before": {"auc": auc0, "headroom": headroom(auc0, oracle), "threshold": t0,
                       **rates(y, s0 >= t0), **calib(y, s0)},
        }
        adapted = {"none": (None, s0)}
        ref_hist = homes["home_ibn"].adaptation["reference_histogram"]  # DEV tune's grey scale, as `adapt --home`
        for method, src in (("batchnorm", None), ("feature_align", source), ("intensity", None),
                            ("intensity_batchnorm", None)):
            ad, _, sa = fit_adaptation(loaded, imgs, method, src, reference_hist=ref_hist)
            adapted[method] = (ad, sa)
        lf = label_free(loaded, y, oracle, s0, adapted, homes, args.seed)
        entry["label_free"] = lf
        cal: dict[str, Any] = {}
        # N pairs to fit and at least 100 left to measure on; a small demo site gets half its images
        n_pairs = args.pairs if len(y) >= args.pairs + 100 else int(len(y) // 2)
        for base in ("none", "batchnorm", "intensity_batchnorm"):
            s = adapted[base][1]
            cal[base] = {
                "sensitivity_target": calibrate_draws(y, s, groups, n_pairs, args.repeats, args.seed,
                                                      "sensitivity", args.target_sensitivity),
                "specificity_target": calibrate_draws(y, s, groups, n_pairs, args.repeats, args.seed,
                                                      "specificity", args.target_specificity),
            }
        entry["calibrate"] = cal
        results[site] = entry
        write(args, model_path, t_start, log, results)  # after every site: a long run keeps what it measured
        print(f"{site}: n {len(y)}, AUC {auc0:.3f} (oracle {oracle:.3f}, headroom {headroom(auc0, oracle):.2f}); "
              + "; ".join(f"{k} AUC {v['auc']:.3f} sens {v['sensitivity']:.2f} spec {v['specificity']:.2f} "
                          f"prev {v['prevalence_estimate']:.2f}" for k, v in lf.items()), flush=True)

    print(markdown(write(args, model_path, t_start, log, results)))
    return 0


def write(args: argparse.Namespace, model_path: Path, t_start: float, log: list[str],
          results: dict[str, Any]) -> dict[str, Any]:
    cmd = " ".join(["python", "bench/bench_adapt.py", *sys.argv[1:]])
    earlier: list[str] = []
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        earlier = [c for c in old.get("commands", [old.get("command", "")]) if c and c != cmd]
    doc = {
        "commands": [*earlier, cmd],
        "model": str(model_path), "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()), "seconds": round(time.perf_counter() - t_start, 1), "log": log,
        "pairs": args.pairs, "repeats": args.repeats, "sites": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=float))
    return doc


def _f(v: float, d: int = 2) -> str:
    if v is None or not np.isfinite(v):
        return "NA"
    return "degenerate" if abs(v) > 100 else f"{v:.{d}f}"  # e.g. a slope fitted to all-zero probabilities


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| site (n images) | stage | AUC (oracle; headroom) | cut-off | sensitivity | specificity | "
             "prevalence est. (true) | calibration slope / intercept / ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for site, e in doc["sites"].items():
        b = e["before"]
        head = f"{site} ({e['n_images']})"
        lines.append(f"| {head} | before | {_f(b['auc'])} ({_f(e['oracle_auc'])}; {_f(b['headroom'])}) | "
                     f"{_f(b['threshold'], 3)} | {_f(b['sensitivity'])} | {_f(b['specificity'])} | "
                     f"– ({_f(e['prevalence'])}) | {_f(b['slope'])} / {_f(b['intercept'])} / {_f(b['ece'])} |")
        for m, r in e["label_free"].items():
            name = "label-free: " + r["label"]
            lines.append(f"| | {name} | {_f(r['auc'])} ({_f(r['headroom'])}) | {_f(r['threshold'], 3)} | "
                         f"{_f(r['sensitivity'])} | {_f(r['specificity'])} | {_f(r['prevalence_estimate'])} "
                         f"({_f(r['prevalence_ci'][0])}–{_f(r['prevalence_ci'][1])}) | "
                         f"{_f(r['slope'])} / {_f(r['intercept'])} / {_f(r['ece'])} |")
        for base, c in e["calibrate"].items():
            for key in ("sensitivity_target", "specificity_target"):
                r = c[key]
                tgt = f"{r['target']} {r['value']:.2f}"
                on = {"none": "model", "batchnorm": "BatchNorm-adapted model"}.get(base, f"{base}-adapted model")
                lines.append(
                    f"| | calibrate, {r['n_pairs']} pairs ({on}), {tgt}; rest n≈{r['n_rest_median']} | – | – | "
                    f"{_f(r['sensitivity']['median'])} [{_f(r['sensitivity']['p10'])}–{_f(r['sensitivity']['p90'])}] | "
                    f"{_f(r['specificity']['median'])} [{_f(r['specificity']['p10'])}–{_f(r['specificity']['p90'])}] | – | "
                    f"{_f(r['slope']['median'])} / {_f(r['intercept']['median'])} / {_f(r['ece']['median'])} |")
    return "\n".join(lines)


def readme_tables(doc: dict[str, Any]) -> str:
    """The README's two tables: the story per site, and every label-free variant on the far sites."""
    out = ["| site (images, prevalence) | AUC, oracle (headroom) | stage | cut-off | sensitivity | specificity | "
           "prevalence estimate | calibration slope / intercept / ECE |", "|---|---|---|---|---|---|---|---|"]
    for site, e in doc["sites"].items():
        b, lf = e["before"], e["label_free"][DEFAULT_LABEL_FREE]
        head = f"{site} ({e['n_images']}, {_f(e['prevalence'])})"
        out.append(f"| {head} | {_f(b['auc'], 3)}, {_f(e['oracle_auc'], 3)} ({_f(b['headroom'])}) | before | "
                   f"{_f(b['threshold'], 3)} | {_f(b['sensitivity'])} | {_f(b['specificity'])} | – | "
                   f"{_f(b['slope'])} / {_f(b['intercept'])} / {_f(b['ece'])} |")
        out.append(f"| | {_f(lf['auc'], 3)} ({_f(lf['headroom'])}) | label-free: grey scale + BatchNorm + home + EM | "
                   f"{_f(lf['threshold'], 3)} | {_f(lf['sensitivity'])} | {_f(lf['specificity'])} | "
                   f"{_f(lf['prevalence_estimate'])} ({_f(lf['prevalence_ci'][0])}–{_f(lf['prevalence_ci'][1])}) | "
                   f"{_f(lf['slope'])} / {_f(lf['intercept'])} / {_f(lf['ece'])} |")
        for base, tag in (("none", ""),):  # on the BatchNorm-adapted model too: in the JSON
            for key in ("sensitivity_target", "specificity_target"):
                r = e["calibrate"][base][key]
                hit = r[f"{r['target']}_within_0.05"]
                out.append(
                    f"| | | calibrate, {r['n_pairs']} pairs{tag}: {r['target']} {r['value']:.2f} "
                    f"(rest n ≈ {r['n_rest_median']}; within 0.05 in {hit:.0%} of draws) | – | "
                    f"{_f(r['sensitivity']['median'])} [{_f(r['sensitivity']['p10'])}–{_f(r['sensitivity']['p90'])}] | "
                    f"{_f(r['specificity']['median'])} [{_f(r['specificity']['p10'])}–{_f(r['specificity']['p90'])}] | – | "
                    f"{_f(r['slope']['median'])} [{_f(r['slope']['p10'])}–{_f(r['slope']['p90'])}] / "
                    f"{_f(r['intercept']['median'])} / {_f(r['ece']['median'])} |")
    out += ["", "| site | label-free variant | AUC (headroom) | cut-off | sensitivity | specificity | "
                "prevalence estimate (true) | calibration slope / intercept |", "|---|---|---|---|---|---|---|---|"]
    for site, e in doc["sites"].items():
        if not site.startswith("FAR"):
            continue  # every site's variants are in the JSON
        for k, r in e["label_free"].items():
            out.append(f"| {site} | {r['label']} | {_f(r['auc'], 3)} ({_f(r['headroom'])}) | {_f(r['threshold'], 3)} | "
                       f"{_f(r['sensitivity'])} | {_f(r['specificity'])} | {_f(r['prevalence_estimate'])} "
                       f"({_f(r['prevalence_true'])}) | {_f(r['slope'])} / {_f(r['intercept'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--readme":  # print the README tables from a results file
        print(readme_tables(json.loads(Path(sys.argv[2]).read_text())))
        raise SystemExit(0)
    raise SystemExit(main())
