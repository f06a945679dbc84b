"""``bonescreen calibrate``: recalibrate a model on a site's own DXA-paired results -> a named site profile."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_profile_output(p: argparse.ArgumentParser) -> None:
    """Where a new profile goes (shared by ``calibrate`` and ``adapt``)."""
    g = p.add_argument_group("output")
    g.add_argument("--profile", required=True, metavar="NAME", help="name of the site profile to write")
    g.add_argument("--out", type=Path, metavar="PT",
                   help="write the artifact with the new profile here (default: update MODEL in place; "
                   "either way the weights are written back unchanged)")
    g.add_argument("--replace", action="store_true", help="overwrite an existing profile of that name")
    g.add_argument("--report", type=Path, metavar="JSON", help="also write the full report as JSON")
    g.add_argument("--dry-run", action="store_true", help="fit and print, write nothing to the artifact")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "calibrate",
        help="recalibrate a model on local DXA-paired results: a named site profile in the artifact",
        description=(
            "Fit a site profile from N local images whose DXA result is known: a recalibration of the "
            "score (identity, Platt or isotonic, chosen by cross-validated log-loss), the cut-off for a "
            "target sensitivity or specificity, PPV/NPV at the local (or a given) prevalence, an optional "
            "abstain band. Prints before/after calibration slope and intercept, ECE, sensitivity and "
            "specificity with 95% CIs, and a learning curve over N. The profile is stored by name in the "
            "artifact; screening uses it only when asked for it by name. The weights never change."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="model artifact (.pt), stage2 or stage1")
    src = p.add_argument_group("local DXA-paired results (one of)")
    src.add_argument("--manifest", type=Path, metavar="CSV",
                     help="cohort manifest with paths and labels; the images are scored here")
    src.add_argument("--results", type=Path, metavar="DIR|CSV",
                     help="`bonescreen screen` output (folder or results.csv), joined to --labels")
    src.add_argument("--labels", type=Path, metavar="CSV",
                     help="labels table for --results: image_id and/or path, and label (1 = low bone mass)")
    src.add_argument("--site", help="--manifest: only this site's rows")
    src.add_argument("--split", help="--manifest: only this split's rows")
    src.add_argument("--cache", default="bonescreen-cache", help="--manifest: preprocessing cache (default: %(default)s)")
    src.add_argument("--allow-unmatched", action="store_true",
                     help="--results: leave out (and count) labelled images the results never screened, "
                     "instead of refusing")
    x0 = src.add_mutually_exclusive_group()
    x0.add_argument("--base-profile", metavar="NAME",
                    help="--manifest: score with this label-free profile's adapted network and calibrate on top")
    x0.add_argument("--adapt", choices=["batchnorm", "intensity", "intensity_batchnorm"],
                    help="--manifest: first adapt the network to these images as `adapt` does (batchnorm: "
                    "re-estimate BatchNorm statistics; intensity: record their grey-level histogram as the "
                    "reference a new site is matched to; intensity_batchnorm: both), then calibrate the adapted "
                    "scores; at the development site this makes the home profile that `adapt --home` needs")
    op = p.add_argument_group("operating point (default: --target-sensitivity 0.90)")
    x = op.add_mutually_exclusive_group()
    x.add_argument("--target-sensitivity", type=float, metavar="S")
    x.add_argument("--target-specificity", type=float, metavar="S")
    x.add_argument("--youden", action="store_true", help="maximise sensitivity + specificity")
    x.add_argument("--target-probability", type=float, metavar="P",
                   help="flag when the recalibrated probability is at least P")
    op.add_argument("--prevalence", type=float, metavar="P",
                    help="screening-population prevalence for PPV/NPV (default: only the local sample's)")
    ab = op.add_mutually_exclusive_group()
    ab.add_argument("--abstain-width", type=float, metavar="W",
                    help="indeterminate when the site probability is within W of the cut-off's")
    ab.add_argument("--abstain-rates", metavar="SENS,SPEC",
                    help="indeterminate between the cut-offs keeping sensitivity >= SENS and specificity >= SPEC")
    fit = p.add_argument_group("fitting")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    fit.add_argument("--min-pairs", type=int, default=20, help="fewest local pairs accepted (default 20)")
    fit.add_argument("--learning-curve", default="25,50,100,200,400", metavar="N,N,...",
                     help="sizes for the learning curve ('' for none; default %(default)s)")
    fit.add_argument("--repeats", type=int, default=20, help="draws per learning-curve size (default 20)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-progress", action="store_true")
    add_profile_output(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.adapt.calibrate import (
        CalibrateConfig,
        calibrate_pairs,
        format_report,
        pairs_from_manifest,
        pairs_from_results,
    )
    from bonescreen.adapt.profile import PROFILE_TASKS_TEXT, TASK_SCORE, check_name, get_profile, profiled_model
    from bonescreen.adapt.recalibrate import CalibrationError
    from bonescreen.artifact import load_artifact, weights_fingerprint

    check_name(args.profile)
    if (args.manifest is None) == (args.results is None):
        raise CalibrationError("give the local pairs as --manifest CSV, or as --results DIR with --labels CSV")
    if args.results is not None and args.labels is None:
        raise CalibrationError("--results needs --labels (the DXA labels to join by image_id or path)")
    if (args.base_profile or args.adapt) and args.manifest is None:
        raise CalibrationError("--base-profile/--adapt need --manifest: the images must be scored by the adapted network")
    target, value = "sensitivity", 0.90
    for name in ("sensitivity", "specificity", "probability"):
        v = getattr(args, f"target_{name}")
        if v is not None:
            target, value = name, v
    if args.youden:
        target = "youden"
    sens = spec = None
    if args.abstain_rates:
        try:
            sens, spec = (float(v) for v in args.abstain_rates.split(","))
        except ValueError as exc:
            raise CalibrationError(f"--abstain-rates wants SENS,SPEC, got {args.abstain_rates!r}") from exc
    try:
        sizes = tuple(int(v) for v in args.learning_curve.split(",") if v.strip())
    except ValueError as exc:
        raise CalibrationError(f"--learning-curve wants sizes like 25,50,100, got {args.learning_curve!r}") from exc
    cfg = CalibrateConfig(target=target, target_value=value, folds=args.folds, min_pairs=args.min_pairs,
                          prevalence=args.prevalence, abstain_width=args.abstain_width,
                          abstain_sensitivity=sens, abstain_specificity=spec, learning_curve=sizes,
                          repeats=args.repeats, seed=args.seed)
    loaded = load_artifact(args.model)
    task = loaded.spec.task
    if task not in TASK_SCORE:
        raise CalibrationError(f"calibrate works on {PROFILE_TASKS_TEXT} models; {args.model.name} is {task!r}")
    adaptation = None
    if args.base_profile:
        base = get_profile(loaded, args.base_profile)
        adaptation = base.adaptation
        pairs = pairs_from_manifest(profiled_model(loaded, base), args.manifest, args.cache, site=args.site,
                                    split=args.split, progress=not args.no_progress)
    elif args.adapt:
        from bonescreen.adapt.calibrate import manifest_images, select_manifest
        from bonescreen.adapt.tta import adapted_model, fit_home_adaptation

        frame = select_manifest(args.manifest, task, site=args.site, split=args.split)
        adaptation = fit_home_adaptation(loaded, manifest_images(frame, args.cache, loaded.size, not args.no_progress),
                                         args.adapt)
        pairs = pairs_from_manifest(adapted_model(loaded, adaptation), frame, args.cache,
                                    progress=not args.no_progress)
    elif args.manifest is not None:
        pairs = pairs_from_manifest(loaded, args.manifest, args.cache, site=args.site, split=args.split,
                                    progress=not args.no_progress)
    else:
        pairs = pairs_from_results(args.results, args.labels, artifact=args.model, task=task,
                                   allow_unmatched=args.allow_unmatched)
    outcome = calibrate_pairs(pairs, name=args.profile, fingerprint=weights_fingerprint(loaded.model), task=task,
                              base_threshold=float(loaded.spec.threshold), config=cfg, adaptation=adaptation,
                              base_profile=args.base_profile)
    return finish_profile(args, outcome, format_report(outcome.report), "site profile")


def finish_profile(args: argparse.Namespace, outcome: Any, text: str, what: str) -> int:
    """Print the report, write it (``--report``), then the profile unless ``--dry-run`` (calibrate, adapt)."""
    from bonescreen.adapt.profile import write_profile

    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(outcome.report, indent=2, default=str))
    if args.dry_run:
        print("\n(dry run: no profile written)")
        return 0
    dest = write_profile(args.model, outcome.profile, out=args.out, replace=args.replace)
    print(f"\n{what} {args.profile!r} written to {dest} (list it with `bonescreen profiles {dest}`; "
          f"screen with it: `bonescreen screen ... --model {dest} --site-profile {args.profile}`; the model "
          "screens as before unless the profile is asked for by name)")
    return 0
