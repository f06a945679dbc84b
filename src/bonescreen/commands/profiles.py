"""``bonescreen profiles``: list, show, export, import or remove a model's site profiles."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "profiles",
        help="list, show, export, import or remove the site profiles stored in a model artifact",
        description=(
            "Site profiles (from `bonescreen calibrate` and `bonescreen adapt`) live inside the model "
            "artifact, each bound to its weights. Without options: list them. --export writes one as "
            "JSON; --import adds one exported from the same model (a profile for other weights is "
            "refused); --remove deletes one. The weights are never changed."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--show", metavar="NAME", help="print one profile (without per-layer numbers) as JSON")
    x.add_argument("--export", nargs=2, metavar=("NAME", "JSON"), help="write profile NAME to a JSON file")
    x.add_argument("--import", dest="import_", metavar="JSON", help="add a profile from a JSON file")
    x.add_argument("--remove", metavar="NAME", help="delete profile NAME")
    p.add_argument("--as", dest="as_name", metavar="NAME", help="--import: store it under this name")
    p.add_argument("--replace", action="store_true", help="--import: overwrite a profile of the same name")
    p.add_argument("--out", type=Path, metavar="PT", help="--import/--remove: write a new artifact here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.adapt.profile import export_profile, import_profile, list_profiles, remove_profile

    if args.export:
        dest = export_profile(args.model, args.export[0], args.export[1])
        print(f"profile {args.export[0]!r} written to {dest}")
        return 0
    if args.import_:
        dest = import_profile(args.model, args.import_, name=args.as_name, replace=args.replace, out=args.out)
        print(f"profile imported into {dest}")
        return 0
    if args.remove:
        dest = remove_profile(args.model, args.remove, out=args.out)
        print(f"profile {args.remove!r} removed from {dest}")
        return 0
    profiles = list_profiles(args.model)
    if args.show:
        if args.show not in profiles:
            from bonescreen.adapt.profile import ProfileError

            raise ProfileError(f"{args.model.name} has no site profile {args.show!r}; it has {sorted(profiles) or 'none'}")
        print(json.dumps(profiles[args.show].summary(), indent=2))
        return 0
    if not profiles:
        print(f"{args.model.name}: no site profiles")
        return 0
    for name, prof in sorted(profiles.items()):
        d = prof.data
        band = f", abstain [{prof.abstain.low:.4g}, {prof.abstain.high:.4g})" if prof.abstain else ""
        adapt = (prof.adaptation or {}).get("method", "none")
        print(f"{name}: {prof.kind}, {d.get('n', '?')} images, cut-off {prof.threshold:.4g} "
              f"(probability {prof.threshold_probability:.3f}), recalibration {prof.recalibration.method}, "
              f"adaptation {adapt}{band}, created {prof.created}")
    return 0
