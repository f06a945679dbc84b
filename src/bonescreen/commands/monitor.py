"""``bonescreen monitor``: DXA results that arrived after screening -> AUC, calibration, drift, alerts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bonescreen.schema import POPULATIONS

STORE_ENV = "BONESCREEN_MONITOR_STORE_URL"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="join later DXA results to earlier screening results: AUC, calibration, drift, alerts, HTML page",
        description=(
            "Join a DXA export to earlier screening results (results.csv from `bonescreen screen` and/or the "
            "service store): the same patient, a DXA within the window after the CXR. Writes monitor.html, "
            "monitor.json, alerts.csv, groups.csv and joined.csv (no raw patient ids) into --out."
        ),
    )
    p.add_argument("--results", nargs="+", type=Path, default=[], metavar="CSV",
                   help="results.csv file(s) written by `bonescreen screen`")
    p.add_argument("--store", metavar="URL",
                   help="service store (SQLAlchemy URL, e.g. sqlite:///data/bonescreen.db); a URL with a "
                        f"password is refused here: use --store-url-file or ${STORE_ENV}")
    p.add_argument("--store-url-file", type=Path, help="file holding the store URL (kept off the command line)")
    p.add_argument("--dxa", nargs="+", type=Path, required=True, metavar="CSV", help="DXA export(s)")
    p.add_argument("--columns", help="DXA column mapping or preset (generic, lunar, hologic, osteosys), as in `cohort`")
    p.add_argument("--date-format", help="strptime format for non-ISO DXA dates, e.g. %%m/%%d/%%Y")
    p.add_argument("--pseudonym-key-file", type=Path,
                   help="the HMAC key that made the results' patient pseudonyms (screen's or the service's); "
                        "the DXA ids are pseudonymised with it to join")
    p.add_argument("--model", type=Path, help="model.pt: its model card's tuning score histogram is the drift reference")
    p.add_argument("--config", type=Path, help="monitor.yaml (window, grouping, reference, alert floors)")
    p.add_argument("--window", type=int, default=None, help="max days from CXR to DXA (default 180)")
    p.add_argument("--population", choices=list(POPULATIONS), default=None)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--fail-on-alert", action="store_true", help="exit status 3 when there is an alert (for cron)")
    p.set_defaults(func=run)


def store_url(args: argparse.Namespace) -> str | None:
    """The store URL from --store, --store-url-file or the environment; never a password on argv."""
    from sqlalchemy.engine import make_url

    from bonescreen.monitor import MonitorError

    if args.store:
        try:
            if make_url(args.store).password:
                raise MonitorError("--store: a database password does not belong on the command line (it shows "
                                   f"in the process list and shell history); put the URL in --store-url-file or ${STORE_ENV}")
        except MonitorError:
            raise
        except Exception as exc:
            raise MonitorError(f"--store: not a database URL ({type(exc).__name__})") from None
        return str(args.store)
    if args.store_url_file:
        try:
            return args.store_url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MonitorError(f"cannot read --store-url-file: {exc.strerror or exc}") from None
    return os.environ.get(STORE_ENV) or None


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from bonescreen.cohort import load_column_map
    from bonescreen.monitor import (
        MonitorError,
        load_monitor_config,
        read_results_csv,
        read_results_store,
        run_monitor,
        write_monitor,
    )

    cfg = load_monitor_config(args.config, window_days=args.window, population=args.population)
    frames = []
    if args.results:
        frames.append(read_results_csv(args.results))
    url = store_url(args)
    if url:
        frames.append(read_results_store(url))
    if not frames:
        raise MonitorError("give screening results: --results results.csv and/or --store URL")
    results = pd.concat(frames, ignore_index=True).drop_duplicates(["image_id"], keep="first")
    card = None
    if args.model:
        from bonescreen.artifact import load_artifact

        card = load_artifact(args.model).spec.model_card
    res = run_monitor(results, args.dxa, config=cfg, key_file=args.pseudonym_key_file,
                      column_map=load_column_map(args.columns) if args.columns else None,
                      date_format=args.date_format, model_card=card)
    files = write_monitor(res, args.out)
    c = res.counts
    print(f"screening results {c['results']}, eligible and scored {c['eligible_scored']}, joined to a DXA "
          f"{c['joined']} (of {c['dxa_exams']} DXA exams, {c['dxa_exams_joined']} used)")
    o = res.overall
    if o.get("n"):
        def f(d: dict | None) -> str:
            return "NA" if not d or d.get("value") is None else f"{d['value']:.3f}"

        print(f"overall: AUC {f(o.get('auc'))}, sensitivity {f(o.get('sensitivity'))}, specificity "
              f"{f(o.get('specificity'))}, calibration slope {f(o.get('calibration_slope'))}, "
              f"intercept {f(o.get('calibration_intercept'))}")
    for note in res.notes:
        print(f"note: {note}")
    for a in res.alerts:
        v = "NA" if a["value"] is None else f"{a['value']:.3f}"
        print(f"ALERT {a['scope']} {a['group']}: {a['metric']} {v} ({a['rule']}, n {a['n']})")
    print(f"page: {files['html']}")
    return 3 if res.alerts and args.fail_on_alert else 0
