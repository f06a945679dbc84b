"""``bonescreen adapt``: label-free adaptation to a site's images -> a named site profile (opt-in)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from bonescreen.commands.calibrate import add_profile_output
    from bonescreen.commands.screen import add_gate_arguments

    p = sub.add_parser(
        "adapt",
        help="label-free adaptation to a new site's images (no DXA needed): a named site profile",
        description=(
            "For a site with images but no DXA results yet: re-estimate the network's normalisation "
            "statistics on the site's eligible images (BatchNorm layers, or penultimate features aligned "
            "to the development data), estimate the site's prevalence from the adapted scores by EM "
            "(Saerens et al. 2002) with a bootstrap CI, and move the cut-off by Bayes' rule for it. "
            "Prints what it estimated and changed, and writes a new named profile; screening uses it "
            "only when asked for it by name. The weights never change. Once DXA results arrive, "
            "`bonescreen calibrate --base-profile NAME` measures and replaces the label-free guesses."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="model artifact (.pt), stage2 or stage1")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="the site's images: files, folders or manifest CSVs (as for `screen`)")
    p.add_argument("--method", default="auto",
                   choices=["auto", "none", "batchnorm", "feature_align", "intensity", "intensity_batchnorm"],
                   help="auto (default): the --home profile's adaptation; without --home, intensity_batchnorm "
                   "when --reference images are given (intensity for a network without BatchNorm), else batchnorm "
                   "where the network has BatchNorm layers, else refused (see the README for what was measured)")
    p.add_argument("--reference", nargs="+", metavar="INPUT",
                   help="images of the development site: its grey-level histogram (intensity adaptations, when "
                   "no --home profile holds one) and feature statistics (feature_align)")
    p.add_argument("--home", metavar="NAME",
                   help="a calibrated profile of the development site made with the same adaptation "
                   "(`calibrate --adapt intensity_batchnorm --site DEV --split tune`): makes the scores "
                   "probabilities EM can trust, and holds the grey scale a new site is matched to")
    p.add_argument("--rule", choices=["keep", "probability", "home", "sensitivity"],
                   help="cut-off: keep (the artifact's, on the adapted score; default without --home), "
                   "probability (site probability >= the artifact's cut-off; default with --home), "
                   "home (the home profile's cut-off), sensitivity (see --target-sensitivity)")
    p.add_argument("--target-sensitivity", type=float, metavar="S",
                   help="rule sensitivity: the cut-off whose sensitivity, estimated from the site "
                   "probabilities, is S")
    p.add_argument("--train-prior", type=float, metavar="P",
                   help="without --home: the model's training prevalence (default: from its model card)")
    p.add_argument("--no-prevalence", action="store_true",
                   help="adapt the network only; keep the training prevalence")
    p.add_argument("--abstain-width", type=float, metavar="W",
                   help="indeterminate when the site probability is within W of the cut-off's")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the prevalence CI (default 1000)")
    p.add_argument("--min-images", type=int, default=30, help="fewest eligible images accepted (default 30)")
    p.add_argument("--max-images", type=int, default=5000, help="use at most this many images (default 5000)")
    p.add_argument("--workers", type=int, default=2, help="decode/preprocess threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    add_gate_arguments(p)
    add_profile_output(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.adapt.labelfree import LabelFreeConfig, adapt_images, collect_images, format_report
    from bonescreen.adapt.profile import check_name, get_profile
    from bonescreen.adapt.recalibrate import CalibrationError
    from bonescreen.adapt.tta import feature_statistics, intensity_histogram
    from bonescreen.artifact import load_artifact
    from bonescreen.commands.screen import gate_overrides

    check_name(args.profile)
    loaded = load_artifact(args.model)
    rule = args.rule or ("sensitivity" if args.target_sensitivity is not None else None)
    home = get_profile(loaded, args.home) if args.home else None
    cfg = LabelFreeConfig(method=args.method, train_prior=args.train_prior, rule=rule,
                          target_value=args.target_sensitivity, estimate_prevalence=not args.no_prevalence,
                          abstain_width=args.abstain_width, n_boot=args.bootstrap, seed=args.seed,
                          min_images=args.min_images)
    gate = gate_overrides(args)
    images, meta, skipped = collect_images(args.inputs, loaded, gate=gate, workers=args.workers,
                                           max_images=args.max_images)
    source = ref_hist = None
    if args.reference:
        ref, _, _ = collect_images(args.reference, loaded, gate=gate, workers=args.workers,
                                   max_images=args.max_images)
        if len(ref) < 2:
            raise CalibrationError("--reference holds fewer than 2 eligible images")
        if cfg.method == "feature_align":
            source = feature_statistics(loaded, ref)
        ref_hist = intensity_histogram(ref)
    outcome = adapt_images(loaded, images, name=args.profile, config=cfg, source_stats=source, home=home,
                           meta=meta, skipped=skipped, reference_hist=ref_hist)
    from bonescreen.commands.calibrate import finish_profile

    return finish_profile(args, outcome, format_report(outcome.report), "label-free site profile")
