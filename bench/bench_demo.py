"""Regenerate the README's demo table: `bonescreen demo` with its defaults, then one JSON and a markdown table.

    python bench/bench_demo.py [--out /tmp/bonescreen-bench-demo] [--json bench/results/demo.json]
    python bench/bench_demo.py --from-run /tmp/bonescreen-bench-demo   # re-print from a finished run

Runs ``bonescreen.demo.run_demo`` (phantom -> cohort -> teacher -> pseudo-labels ->
student -> stage 1 -> predictions -> reports) with the CLI's defaults into ``--out``
(a previous phantom there is reused, models are retrained), then writes
``--json``: the commit (and whether the tree was dirty), the machine (CPU model,
cores, AVX-512/AMX flags, load average before and after), torch version, wall time
and per-stage timings, every AUC with its CI next to the phantom's oracle AUC and
the headroom fraction (AUC - 0.5) / (oracle - 0.5), and the cascade's 3x3 tables.
It prints the markdown tables pasted into the README ("The demo run").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SITES = ("DEV", "EXT_A", "EXT_B", "EXT_C", "FAR")  # the order of the columns; other sites follow
SITE_LABELS = {"DEV": "DEV (internal test)", "EXT_A": "EXT_A", "EXT_B": "EXT_B", "EXT_C": "EXT_C (categories only)",
               "FAR": "FAR (far vendor look)"}


def sites_of(res: dict[str, Any]) -> list[str]:
    """The sites a run scored, in the README's column order (a phantom without FAR has no FAR column)."""
    seen = {str(r["site"]) for r in res["summary"]}
    return [s for s in SITES if s in seen] + sorted(seen - set(SITES))


def machine() -> dict[str, Any]:
    """CPU model, core count and the AVX-512 / AMX flags (the project's ISA line), load average."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
        info["isa"] = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_]*)\b", text)))
    except OSError:
        info["cpu"], info["isa"] = platform.processor(), []
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def collect(out: Path) -> dict[str, Any]:
    """Everything the README tables need, from a finished demo folder."""
    summary = pd.read_csv(out / "summary.csv")
    return {
        "summary": summary.where(summary.notna(), None).to_dict("records"),
        "cascade": json.loads((out / "cascade.json").read_text()),
        "timings": json.loads((out / "timings.json").read_text()),
        "pseudolabel": json.loads((out / "pseudolabel_counts.json").read_text()),
        "adaptation": json.loads((out / "site_adaptation.json").read_text())
        if (out / "site_adaptation.json").is_file() else [],
    }


def training_seconds(out: Path) -> dict[str, float]:
    """Per training, the sum of its epochs' seconds (metrics.csv): the training cost even of a resumed run."""
    t = {}
    for stage in ("teacher", "student", "stage1"):
        f = out / stage / "metrics.csv"
        if f.is_file():
            t[stage] = round(float(pd.read_csv(f)["seconds"].sum()), 1)
    return t


def markdown(res: dict[str, Any]) -> str:
    """The README tables: AUC (CI) · headroom per model and site, oracle rows, then the cascade per site."""
    rows = {(r["model"], r["site"]): r for r in res["summary"]}
    SITES = sites_of(res)  # noqa: N806 (shadows the module order on purpose)
    n = {s: rows.get(("student", s), {}).get("n") for s in SITES}
    n1 = {s: rows.get(("stage1", s), {}).get("n") for s in SITES}
    head = "| model | " + " | ".join(f"{SITE_LABELS.get(s, s)} (n {n[s]} / {n1[s]})" for s in SITES) + " |"
    lines = [head, "|" + "---|" * (len(SITES) + 1)]

    def cell(r: dict[str, Any] | None) -> str:
        if not r or r.get("auc") is None:
            return "NA"
        h = r.get("headroom")
        return f"{r['auc_ci']} · {h:.2f}" if h is not None else r["auc_ci"]

    for model, label in (("teacher", "teacher (stage 2)"), ("student", "student (stage 2)")):
        lines.append(f"| {label} | " + " | ".join(cell(rows.get((model, s))) for s in SITES) + " |")
    lines.append("| oracle AUC, stage 2 | " + " | ".join(
        f"{rows[('student', s)]['oracle_auc']:.3f}" if rows.get(("student", s), {}).get("oracle_auc") else "NA"
        for s in SITES) + " |")
    lines.append("| stage 1 (osteoporosis) | " + " | ".join(cell(rows.get(("stage1", s))) for s in SITES) + " |")
    lines.append("| oracle AUC, stage 1 | " + " | ".join(
        f"{rows[('stage1', s)]['oracle_auc']:.3f}" if rows.get(("stage1", s), {}).get("oracle_auc") else "NA"
        for s in SITES) + " |")
    out = ["\n".join(lines), ""]
    names = {"normal": "normal", "low_bone_mass": "low bone mass", "osteoporosis": "osteoporosis"}
    for site in SITES:
        t = res["cascade"].get(site)
        if not t:
            continue
        acc = t["accuracy"]
        out.append(f"Cascade on {SITE_LABELS.get(site, site)} ({t['n']} images; accuracy {acc['value']:.2f} "
                   f"({acc['lo']:.2f}–{acc['hi']:.2f})): n (share of the true class, 95% CI)")
        out.append("")
        out.append("| true \\ predicted | " + " | ".join(names[c] for c in t["categories"]) + " |")
        out.append("|---|---|---|---|")
        for i, ci in enumerate(t["categories"]):
            cells = []
            for cj in t["categories"]:
                r = t["rates"][ci][cj]
                cells.append(f"{r['n']}" if r["rate"] is None else
                             f"{r['n']} ({r['rate']:.2f}, {r['lo']:.2f}–{r['hi']:.2f})")
            out.append(f"| {names[ci]} (n {sum(t['counts'][i])}) | " + " | ".join(cells) + " |")
        out.append("")
    if res.get("adaptation"):
        out.append("Trust at each external site (student; `bonescreen.adapt.story`): measured on a held-out half of "
                   "the site's patients; label-free = `adapt --home HOME` (no label read), calibrate = `calibrate` "
                   "on the other half's DXA results, target sensitivity 0.90")
        out.append("")
        out.append("| site (held-out images, prevalence) | stage | AUC, oracle (headroom) | cut-off | sensitivity | "
                   "specificity |")
        out.append("|---|---|---|---|---|---|")
        for st in res["adaptation"]:
            for i, r in enumerate(st["rows"]):
                head = f"{SITE_LABELS.get(st['site'], st['site'])} ({st['n_held_out']}, {st['prevalence_held_out']:.2f})"
                hr = "" if r["headroom"] is None else f" ({r['headroom']:.2f})"
                stage = r["stage"] + (f": {r['method']}, prevalence {r['prevalence_estimate']:.2f}"
                                      if "method" in r else "")
                orc = "NA" if r["oracle_auc"] is None else f"{r['oracle_auc']:.3f}"
                out.append(f"| {head if i == 0 else ''} | {stage} | {r['auc']:.3f}, {orc}{hr} | "
                           f"{r['threshold']:.3g} | {r['sensitivity']:.2f} | {r['specificity']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bonescreen-bench-demo"), help="demo output folder")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "demo.json")
    ap.add_argument("--from-run", type=Path, help="only re-read a finished demo folder and print the tables")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="continue interrupted trainings in --out (the JSON then says resumed: true; its timings "
                         "are those of the resumed run, the per-epoch training seconds are in <stage>/metrics.csv)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    if args.from_run:
        res = {**json.loads(args.json.read_text()), **collect(args.from_run)} if args.json.is_file() \
            else collect(args.from_run)
        print(markdown(res))
        return 0

    from bonescreen.demo import DemoConfig, run_demo

    before = {"loadavg": os.getloadavg(), **commit()}
    t0 = time.perf_counter()
    run_demo(args.out, DemoConfig(workers=args.workers, resume=args.resume), progress=False)
    wall = time.perf_counter() - t0
    res = {
        "command": "python bench/bench_demo.py" + (" --resume" if args.resume else ""),
        "resumed": bool(args.resume),
        "training_seconds": training_seconds(args.out),
        "demo_command": f"bonescreen demo --out {args.out} --no-progress",
        **before,
        "loadavg_after": os.getloadavg(),
        "machine": machine(),
        "wall_s": round(wall, 1),
        "config": DemoConfig(workers=args.workers).__dict__,
        **collect(args.out),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(markdown(res))
    print(f"\nwall {wall / 60:.1f} min; stages (s): {res['timings']}; training (s): {res['training_seconds']}; commit {res['commit'][:10]}"
          f"{' (dirty tree)' if res['dirty'] else ''}; CPU {res['machine'].get('cpu')}, "
          f"{res['machine'].get('cores')} cores, {' '.join(res['machine'].get('isa') or []) or 'no AVX-512/AMX'}; "
          f"load {before['loadavg'][0]:.1f} before, {res['loadavg_after'][0]:.1f} after")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
