"""``bonescreen ood``: the out-of-distribution part of a model artifact (fit one for an existing model)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ood",
        help="fit the out-of-distribution model of an existing artifact (upgrades format 1 or 2 to 3)",
        description=(
            "Out-of-distribution check of a model artifact. `ood fit MODEL --manifest M --cache DIR --out NEW.pt` "
            "fits it on the manifest's train split (the model's own features: penultimate embedding and deeper "
            "stages' channel statistics, one Ledoit-Wolf Gaussian per block, combined by their maximum), sets the "
            "refusal and flag thresholds on the tune split and its acquisition-augmented copies, and writes a new "
            "format-3 artifact; the input is never changed. `bonescreen train`, "
            "`distill` and `pediatric train` do this at the end of training."
        ),
    )
    verbs = p.add_subparsers(dest="ood_command", metavar="ACTION", required=True)
    f = verbs.add_parser("fit", help="fit the OOD part on a cohort manifest and write a new artifact")
    f.add_argument("model", metavar="PT", help="model artifact (.pt, format 1, 2 or 3)")
    f.add_argument("--manifest", required=True, nargs="+", metavar="CSV",
                   help="the rows the model was trained on (train split) and tuned on (tune split): a cohort "
                        "manifest, plus a student's proxy.csv (its rows are training rows)")
    f.add_argument("--cache", required=True, metavar="DIR", help="preprocessing cache (filled on first use)")
    f.add_argument("--out", metavar="NEW.pt", help="new artifact (default: MODEL with .ood.pt)")
    f.add_argument("--quantile", type=float, default=None,
                   help="both thresholds are at least this quantile of the tune split's OOD scores (default 0.995)")
    f.add_argument("--augment-copies", type=int, default=None,
                   help="acquisition-augmented copies of each tuning image the thresholds are set on "
                        "(default 4; 0: tuning originals only, and no flag band)")
    f.add_argument("--aug-quantile", type=float, default=None,
                   help="refusal threshold: at least this quantile of the augmented tuning copies (default 0.99)")
    f.add_argument("--flag-quantile", type=float, default=None,
                   help="flag threshold: at least this quantile of the augmented tuning copies (default 0.9); "
                        "images between it and the refusal threshold are scored and marked ood_borderline")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bonescreen.ood import (DEFAULT_AUG_QUANTILE, DEFAULT_AUGMENT_COPIES, DEFAULT_FLAG_QUANTILE, DEFAULT_QUANTILE,
                                fit_ood_for_artifact)

    src = Path(args.model)
    out = Path(args.out) if args.out else src.with_suffix(".ood.pt")
    dest, ood = fit_ood_for_artifact(src, args.manifest, args.cache, out,
                                     quantile=args.quantile if args.quantile is not None else DEFAULT_QUANTILE,
                                     overwrite=args.overwrite, progress=not args.no_progress,
                                     augment_copies=DEFAULT_AUGMENT_COPIES if args.augment_copies is None
                                     else args.augment_copies,
                                     aug_quantile=DEFAULT_AUG_QUANTILE if args.aug_quantile is None
                                     else args.aug_quantile,
                                     flag_quantile=DEFAULT_FLAG_QUANTILE if args.flag_quantile is None
                                     else args.flag_quantile)
    print(f"wrote {dest}: OOD model ({ood.method}, {len(ood.blocks)} feature blocks: "
          f"{', '.join(b.name for b in ood.blocks)}) fitted on {ood.n_fit} training images, {ood.n_tune} tuning "
          f"images; refuse above {ood.threshold:.4g}, flag above {ood.flag_threshold:.4g}")
    return 0
