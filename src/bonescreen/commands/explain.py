"""``bonescreen explain``: Grad-CAM overlays (PNG) for chest radiographs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from bonescreen.commands.screen import add_gate_arguments

    p = sub.add_parser(
        "explain",
        help="Grad-CAM overlays as PNG",
        description=(
            "Write a Grad-CAM overlay (jet heat map on the preprocessed image; red = most "
            "attention) per image to OUT/<image_id>.png and list them in OUT/explain.csv. The "
            "target layer is the backbone's last feature stage, found automatically. Inputs are "
            "gated like `screen` unless --no-gate. A pediatric model is explained towards lower "
            "predicted Z-score (low_bmd) with each image's age, sex, height and weight held fixed."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or manifest CSVs")
    p.add_argument("--model", required=True, metavar="PT", help="model artifact (.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs")
    p.add_argument("--class", dest="target",
                   help="class to explain (default the positive class; a pediatric model: low_bmd only)")
    p.add_argument("--clinical", metavar="CSV",
                   help="pediatric models: height_cm/weight_kg keyed by image_id or patient_id (as in screen)")
    p.add_argument("--no-gate", action="store_true",
                   help="explain any readable image (skip modality/view/age checks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    add_gate_arguments(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from bonescreen.commands.screen import gate_overrides
    from bonescreen.explain import explain_paths

    res = explain_paths(
        args.inputs, args.model, args.out, target=args.target, gate=not args.no_gate,
        gate_overrides=gate_overrides(args), batch_size=args.batch_size, progress=not args.no_progress,
        clinical=args.clinical, ood=args.ood,
    )
    print(f"{res['explained']} overlay(s) for class {res['class']}, {res['skipped']} skipped; list in {res['csv']}")
    return 0 if res["explained"] else 1
