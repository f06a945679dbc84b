"""``bonescreen demo``: the whole recipe on a phantom cohort, deployed as the two-stage cascade."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole recipe on a phantom: cohort, teacher, pseudo-labels, student, stage 1, report",
        description=(
            "Generate a phantom (a development site, external sites, one with category labels only, "
            "and an unlabelled pool), build the cohort, train the teacher, pseudo-label the pool, "
            "distill the student, train the stage-1 (osteoporosis) model, and evaluate them on every site next to "
            "the phantom's oracle AUC; the cascade (stage 1, then the student) is reported as a 3x3 table of "
            "true x predicted category per site. "
            "Re-running with the same --out reuses the phantom."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    p.add_argument("--preset", default="cpu-tiny", help="training preset (default cpu-tiny)")
    p.add_argument("--n-dev", type=int, default=None, help="patients at the development site")
    p.add_argument("--n-external", type=int, default=None, help="patients per external site")
    p.add_argument("--pool", type=int, default=None, help="unlabelled pool images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for AUC/F1 CIs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--resume", action="store_true",
                   help="continue each training from its checkpoint in --out (an interrupted run)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bonescreen.config import parse_overrides
    from bonescreen.demo import DemoConfig, run_demo

    cfg = DemoConfig(preset=args.preset, seed=args.seed, workers=args.workers, bootstrap=args.bootstrap,
                     overrides=parse_overrides(args.set), resume=args.resume)
    for key in ("n_dev", "n_external", "pool"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    res = run_demo(args.out, cfg, progress=not args.no_progress)
    print("\nAUC per site (phantom oracle AUC = best achievable from the latent bone density; "
          "headroom = (AUC - 0.5) / (oracle - 0.5)):")
    print(res.summary.to_string(index=False))
    from bonescreen.evaluate.cascade import cascade_frame

    for site, table in res.cascade.items():
        acc = table["accuracy"]
        print(f"\ncascade on {site} ({table['n']} images, accuracy {acc['value']:.2f}): "
              "n (share of the true class, 95% CI)")
        print(cascade_frame(table).to_string())
    if res.adaptation:
        from bonescreen.adapt.story import format_story

        method = res.adaptation[0]["rows"][1].get("method")
        print("\ntrust at each external site, student, measured on a held-out half of its patients: before; "
              f"label-free (`adapt --home HOME`: {method} adaptation + EM prevalence, no label read); "
              "`calibrate` on the other half's DXA results (target sensitivity 0.90)")
        print(format_story(res.adaptation))
    print("\ntimings (s): " + ", ".join(f"{k} {v}" for k, v in res.timings.items()))
    print(f"report: {res.report_dir / 'report.html'}")
    return 0
