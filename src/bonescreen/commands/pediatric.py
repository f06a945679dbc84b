"""``bonescreen pediatric``: the pediatric variant (BMD Z-score from CXR + age, sex, height, weight).

Subcommands: ``phantom`` (children's phantom with Z-scores), ``cohort``
(your DICOM folders + DXA export, or the phantom: the adult builder with the
pediatric rules, ages 0-17.99), ``train`` (fusion model on the training stack),
``evaluate`` (r, ICC, MAE, Bland-Altman + the low-BMD report), ``explain``
(SHAP + Grad-CAM per-patient figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bonescreen.commands.cohort import add_cohort_arguments


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pediatric",
        help="pediatric variant: BMD Z-score regression from CXR + age/sex/height/weight",
        description="The pediatric variant: phantom, cohort, train, evaluate and explain. "
        "Low BMD is a predicted Z-score <= -2.0.",
    )
    ps = p.add_subparsers(dest="pediatric_command", metavar="STEP")

    ph = ps.add_parser("phantom", help="children's phantom: ages 0-17, Z-scores, ~25%% low BMD")
    ph.add_argument("out", help="output folder (a previous phantom there is replaced)")
    ph.add_argument("--n-per-site", type=int, default=300, help="children per site (default 300)")
    ph.add_argument("--size", type=int, default=256, help="image matrix in pixels (default 256)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical)")
    ph.add_argument("--sites", default=None, help="comma-separated subset of PED,PED_EXT")
    ph.add_argument("--quiet", action="store_true", help="no progress bar")
    ph.set_defaults(func=_phantom)

    co = ps.add_parser(
        "cohort",
        help="pair children's CXRs with DXA exams (Z-scores, ages 0-17.99): your sites or a pediatric phantom",
        usage="%(prog)s [PHANTOM] OUT [--site NAME IMAGES DXA_CSV ...] [--columns PRESET] [options]",
        description="`bonescreen cohort --population pediatric`: the same builder as adults with the pediatric "
        "study's rules (ages 0-17.99, CXR within 90 days of the DXA, Z-score labels, T-scores ignored). "
        "Usage: `pediatric cohort OUT --site NAME DICOM_DIR DXA_CSV [--columns lunar]` for your data, or "
        "`pediatric cohort PHANTOM OUT` for a `pediatric phantom` folder.",
    )
    co.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                    help="output folder, preceded by a `pediatric phantom` folder when building from one")
    add_cohort_arguments(co, pediatric=True)
    co.set_defaults(func=_cohort)

    tr = ps.add_parser("train", help="train the fusion model (image backbone + clinical variables)")
    tr.add_argument("manifest", help="cohort manifest CSV with z_lumbar_spine, age, sex, height_cm, weight_kg")
    tr.add_argument("--out", required=True, help="output folder (model.pt, predictions.csv, regression.json, ...)")
    tr.add_argument("--cache", default="bonescreen-cache", help="preprocessing cache folder (default: %(default)s)")
    tr.add_argument("--preset", default="pediatric-cpu-tiny", help="pediatric-cpu-tiny (default) or pediatric-paper")
    tr.add_argument("--config", help="YAML file (may say 'base: <preset>'); replaces --preset")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set epochs=5 --set arch=resnet18 (repeatable)")
    tr.add_argument("--init-from", type=Path, metavar="MODEL.pt",
                    help="start the image branch from a bonescreen model of the same architecture, e.g. your "
                         "adult screening model (transfer learning; replaces the ImageNet weights, sets pretrained)")
    tr.add_argument("--bmd-weight", type=float, default=0.5, help="loss weight of raw BMD next to Z (default 0.5)")
    tr.add_argument("--z-from", choices=["auto", "head", "reference", "mean"], default="auto",
                    help="predicted Z from the Z head, from predicted BMD through the reference curves "
                         "fitted on the training DXA table, their mean, or the best on the tuning split (auto)")
    tr.add_argument("--z-spread", choices=["match", "none"], default="match",
                    help="match (default): stretch the reported Z to the DXA Z's mean and SD (on the tuning split; "
                         "with --folds on out-of-fold predictions of the training split); none: keep the "
                         "regression's Z (a regression shrinks toward the mean)")
    tr.add_argument("--folds", type=int, default=1, metavar="K",
                    help="K >= 2: the model is the mean of K cross-fitted members (children split into K folds; "
                         "member k trains without fold k), and the Z source, spread and residual SD are fitted on "
                         "their out-of-fold predictions of every training pair: for small cohorts. Costs K "
                         "trainings and K forward passes per screened image (default 1: one model)")
    tr.add_argument("--refit", type=int, default=0, metavar="N",
                    help="with --folds: screen with N members trained on the whole training split (seeds "
                         "seed..seed+N-1) instead of the fold members, which then only fit the Z source, spread "
                         "and residual SD; no data is lost to the folds. Costs K+N trainings and N forward passes "
                         "per image (default 0: screen with the fold members)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--name", default="pediatric", help="model name in predictions.csv")
    tr.set_defaults(func=_train)

    ev = ps.add_parser("evaluate", help="Pearson r, ICC, MAE, Bland-Altman and the low-BMD report")
    ev.add_argument("predictions", nargs="+", type=Path, help="predictions.csv from `pediatric train`")
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--tune", nargs="+", type=Path, default=None, help="tune_predictions.csv (tuned cut-offs)")
    ev.add_argument("--oracle", type=Path, help="phantom oracle.json (oracle AUC and r beside each site)")
    ev.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_evaluate)

    ex = ps.add_parser("explain", help="per-patient PNG: Grad-CAM, SHAP of the clinical variables, predicted vs DXA")
    ex.add_argument("model", type=Path, help="pediatric model.pt")
    ex.add_argument("manifest", type=Path, help="manifest with the rows to explain (and a train split for SHAP's background)")
    ex.add_argument("out", type=Path, help="output folder (PNGs + shap.csv)")
    ex.add_argument("--cache", default="bonescreen-cache", help="preprocessing cache folder (default: %(default)s)")
    ex.add_argument("--split", default="test", help="which split to explain ('all' for every row; default test)")
    ex.add_argument("--limit", type=int, default=20, help="at most this many images (default 20)")
    ex.add_argument("--no-progress", action="store_true")
    ex.set_defaults(func=_explain)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _phantom(args: argparse.Namespace) -> int:
    from bonescreen.phantom import PhantomError, generate_phantom
    from bonescreen.phantom.pediatric import default_pediatric_sites

    sites = default_pediatric_sites()
    if args.sites:
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in sites})
        if unknown:
            raise PhantomError(f"unknown site(s) {unknown}; choose from {[s.name for s in sites]}")
        sites = [s for s in sites if s.name in wanted]
    res = generate_phantom(args.out, sites=sites, n_per_site=args.n_per_site, pool_size=0, size=args.size,
                           seed=args.seed, workers=args.workers, progress=not args.quiet)
    print(f"pediatric phantom written to {res.out_dir}")
    print(f"{'site':<9}{'children':>9}{'images':>8}{'low BMD':>9}{'oracle AUC':>12}{'oracle r':>10}")
    for name, o in res.oracle.items():
        auc = "n/a" if o["auc"] is None else f"{o['auc']:.3f}"
        r = "n/a" if o["r"] is None else f"{o['r']:.3f}"
        print(f"{name:<9}{o['n_patients']:>9}{o['n_images']:>8}{o['prevalence']:>9.3f}{auc:>12}{r:>10}")
    return 0


def _cohort(args: argparse.Namespace) -> int:
    from bonescreen.commands.cohort import run_cohort
    from bonescreen.errors import TableError

    if len(args.paths) > 2:
        raise TableError(f"pediatric cohort takes [PHANTOM] OUT, got {len(args.paths)} paths")
    phantom, args.out = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else (None, args.paths[0])
    return run_cohort(args, population="pediatric", phantom=phantom)


def _train(args: argparse.Namespace) -> int:
    from bonescreen.config import ConfigError, config_from_args
    from bonescreen.pediatric.metrics import summary_lines
    from bonescreen.training.crossfit import train_pediatric_ensemble
    from bonescreen.training.pediatric import train_pediatric

    cfg = config_from_args(args, {"pretrained": str(args.init_from) if args.init_from else None})
    if args.refit and args.folds < 2:
        raise ConfigError("--refit N needs --folds K >= 2: the folds fit the spread the full-data members are "
                          "screened with")
    if args.folds > 1:
        if args.resume:
            raise ConfigError("--resume continues one model's checkpoint; it cannot resume --folds members")
        res = train_pediatric_ensemble(args.manifest, args.out, cfg, cache_root=args.cache, folds=args.folds,
                                       model_name=args.name, bmd_weight=args.bmd_weight, z_from=args.z_from,
                                       z_spread=args.z_spread, refit=args.refit)
    else:
        res = train_pediatric(args.manifest, args.out, cfg, cache_root=args.cache, resume=args.resume,
                              model_name=args.name, bmd_weight=args.bmd_weight, z_from=args.z_from,
                              z_spread=args.z_spread)
    print(f"model: {res.artifact_path}")
    if res.predictions_path:
        print(f"test predictions: {res.predictions_path}")
    if res.tune_predictions_path:
        print(f"tune predictions: {res.tune_predictions_path} (residual SD of Z {res.residual_sd_z:.3f})")
    for line in summary_lines(res.regression):
        print(line)
    if res.dropped_rows:
        print(f"rows left out: {res.dropped_rows}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from bonescreen.pediatric.metrics import run_pediatric_evaluation

    res = run_pediatric_evaluation(args.predictions, args.out, tune=args.tune, oracle=args.oracle,
                                   n_boot=args.bootstrap, seed=args.seed, progress=not args.no_progress)
    print(res["regression_summary"])
    print(res["classification_summary"])
    print(f"report: {args.out}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from bonescreen.explain import explain_manifest

    res = explain_manifest(args.model, args.manifest, args.out, cache_root=args.cache,
                           split=None if args.split == "all" else args.split, limit=args.limit,
                           progress=not args.no_progress)
    print(f"{res['explained']} patient figure(s) in {args.out}; SHAP values in {res['csv']}")
    print("mean |SHAP| (Z units): " + json.dumps({k: round(v, 3) for k, v in res["mean_abs_shap"].items()}))
    return 0
