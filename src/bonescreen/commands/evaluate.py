"""``bonescreen evaluate``: predictions tables -> validation report folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="predictions tables -> report.html, metrics.json, CSV tables (Tables 1-3, Figures 1-2, ROC/PR)",
        description=(
            "Evaluate one or more predictions tables (image_id, score, label; optionally patient_id, "
            "site, sex, age, t_min, severity, model, split) and write a report folder. Several files or a "
            "'model' column give several models; models scoring the same images are compared with DeLong's test."
        ),
    )
    p.add_argument("predictions", nargs="+", type=Path, help="predictions CSV file(s)")
    p.add_argument("--out", type=Path, required=True, help="report folder to write")
    p.add_argument("--tune", nargs="+", type=Path, default=None,
                   help="tuning-set predictions: Youden and target-sensitivity cut-offs are chosen there "
                        "and applied unchanged to the test sets (default: rows with split=tune, if any)")
    p.add_argument("--manifest", type=Path, help="cohort manifest.csv for Table 1")
    p.add_argument("--flow", type=Path, help="flow.json from `bonescreen cohort` for Figure 1")
    p.add_argument("--oracle", type=Path, help="phantom oracle.json: oracle AUC shown next to each site's AUC")
    p.add_argument("--threshold", type=float, default=0.5, help="cut-off for the main tables (default 0.5)")
    p.add_argument("--target-sensitivity", type=float, default=0.9,
                   help="tuned operating point: highest cut-off with this sensitivity on the tuning set")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--age-bands", default="50,55,60,65",
                   help="age band edges (default 50,55,60,65 -> 50-54, 55-59, 60-64, >=65)")
    p.add_argument("--referral-ages", default="65,70", metavar="WOMEN,MEN",
                   help="decision curves compare with referring women >= WOMEN and men >= MEN years "
                        "(default 65,70; 'none': no such rule)")
    p.add_argument("--title", default="bonescreen validation report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.errors import TableError
    from bonescreen.evaluate.report import EvaluateConfig, run_evaluation, summary_text

    try:
        bands = tuple(float(x) for x in args.age_bands.split(",") if x.strip())
    except ValueError as exc:
        raise TableError(f"--age-bands must be comma-separated numbers, got {args.age_bands!r}") from exc
    if not bands or any(b <= a for a, b in zip(bands, bands[1:])):
        raise TableError(f"--age-bands must be increasing numbers, got {args.age_bands!r}")
    if not 0.0 <= args.threshold <= 1.0:
        raise TableError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 0.0 < args.target_sensitivity <= 1.0:
        raise TableError(f"--target-sensitivity must be in (0, 1], got {args.target_sensitivity}")
    if args.bootstrap < 0:
        raise TableError("--bootstrap must be >= 0")
    rule = None
    if args.referral_ages.strip().lower() != "none":
        try:
            women, men = (float(x) for x in args.referral_ages.split(","))
        except ValueError as exc:
            raise TableError(f"--referral-ages must be WOMEN,MEN (e.g. 65,70) or none, got {args.referral_ages!r}") from exc
        rule = (women, men)
    cfg = EvaluateConfig(threshold=args.threshold, n_boot=args.bootstrap, seed=args.seed, age_bands=bands,
                         target_sensitivity=args.target_sensitivity, title=args.title, referral_rule=rule)
    rep, files = run_evaluation(args.predictions, args.out, config=cfg, tune=args.tune, manifest=args.manifest,
                                flow=args.flow, oracle=args.oracle, progress=not args.no_progress)
    print(summary_text(rep))
    print(f"report: {files['report.html']}  ({len(files)} files in {args.out})")
    return 0
