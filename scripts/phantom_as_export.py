"""Turn a `bonescreen pediatric phantom` folder into what a hospital has: DICOM folders and a DXA workstation export.

    python scripts/phantom_as_export.py PHANTOM OUT [--preset lunar|hologic|osteosys] [--seed 0]

For each site of PHANTOM it writes ``OUT/<site>/dicom/`` (the radiographs, renamed
``IM000001.dcm``..., in a flat folder; no phantom.json, no dxa.csv) and
``OUT/<site>/dxa_<preset>.csv``: the DXA table reshaped into the preset's header
names (``bonescreen.cohort.load_preset``, first name of each column), with what real
exports carry and the cohort builder must survive:

* US dates (MM/DD/YYYY; pass ``--date-format %m/%d/%Y``) and a birth date instead of the age;
* sex spelled out (Female / Male), decimal commas in height and weight;
* T-score columns (meaningless in children: the pediatric cohort ignores them) and a
  total-body-less-head Z-score for half of the children;
* a follow-up DXA exam for children who have another frontal CXR (several pairs per child);
* one exact duplicate row, one row with a blank Z-score, one height in metres.

It exists to exercise the pediatric cohort path end to end (tests and the README);
the phantom's own ``bonescreen pediatric cohort PHANTOM OUT`` needs none of it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def export_site(site_dir: Path, out_dir: Path, preset: str = "lunar", seed: int = 0) -> dict[str, Path]:
    """Copy one phantom site's DICOMs to a flat folder and write its DXA table as a ``preset`` export."""
    from bonescreen.cohort import load_preset, scan_images

    rng = np.random.default_rng(seed)
    dicom = out_dir / "dicom"
    dicom.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((site_dir / "images").glob("*.dcm")), start=1):
        shutil.copyfile(f, dicom / f"IM{i:06d}.dcm")
    dxa = pd.read_csv(site_dir / "dxa.csv", dtype={"patient_id": str})
    exam = pd.to_datetime(dxa["exam_date"])
    birth = exam - pd.to_timedelta((dxa["age"].astype(float) + 0.05) * 365.25, unit="D")
    rows = pd.DataFrame({
        "patient_id": dxa["patient_id"],
        "exam_date": exam,
        "birth_date": birth,
        "sex": dxa["sex"].map({"F": "Female", "M": "Male"}),
        "height_cm": dxa["height_cm"].astype(float),
        "weight_kg": dxa["weight_kg"].astype(float),
        "bmd_lumbar_spine": dxa["bmd_lumbar_spine"].astype(float),
        "z_lumbar_spine": dxa["z_lumbar_spine"].astype(float),
        # an adult T-score the workstation prints anyway; meaningless for a child
        "t_lumbar_spine": (dxa["z_lumbar_spine"].astype(float) - 2.5).round(1),
        "z_total_body_less_head": np.where(rng.random(len(dxa)) < 0.5,
                                           (dxa["z_lumbar_spine"].astype(float) + rng.normal(0, 0.4, len(dxa))).round(1),
                                           np.nan),
    })
    # follow-up DXA 10 days after another frontal CXR of the same child, where there is one
    scan = scan_images([dicom], progress=False)
    scan = scan[scan["error"].isna() & scan["view"].isin(["PA", "AP"])]
    follow = []
    for r in rows.itertuples():
        other = scan[(scan["patient_id"] == r.patient_id)
                     & (scan["study_date"].map(lambda d, e=r.exam_date.date(): abs((d - e).days)) > 120)]
        if len(other):
            when = pd.Timestamp(sorted(other["study_date"])[0]) + pd.Timedelta(days=10)
            years = (when - r.exam_date).days / 365.25
            if r.birth_date + pd.Timedelta(days=365) < when:
                follow.append({**r._asdict(), "exam_date": when, "z_lumbar_spine": round(r.z_lumbar_spine + 0.1, 1),
                               "height_cm": r.height_cm + max(0.0, 6.0 * years)})
    if follow:
        rows = pd.concat([rows, pd.DataFrame(follow).drop(columns="Index")], ignore_index=True)
    rows.loc[len(rows)] = rows.iloc[0]  # an exact duplicate (export artefact)
    rows.loc[1, "z_lumbar_spine"] = np.nan  # a blank Z-score
    rows.loc[1, "z_total_body_less_head"] = np.nan
    if len(rows) > 3:
        rows.loc[2, "height_cm"] = rows.loc[2, "height_cm"] / 100.0  # metres, not cm
    out = pd.DataFrame()
    names = {ours: cands[0] for ours, cands in load_preset(preset)["columns"].items()}
    for col in rows.columns:
        v = rows[col]
        if col in ("exam_date", "birth_date"):
            v = pd.to_datetime(v).dt.strftime("%m/%d/%Y")
        elif col in ("height_cm", "weight_kg"):
            v = v.map(lambda x: "" if pd.isna(x) else f"{x:.1f}".replace(".", ","))
        out[names.get(col, col)] = v
    path = out_dir / f"dxa_{preset}.csv"
    out.to_csv(path, index=False)
    return {"dicom": dicom, "dxa": path}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phantom", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="lunar")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sites = sorted(p for p in args.phantom.iterdir() if (p / "dxa.csv").is_file())
    for k, site in enumerate(sites):
        paths = export_site(site, args.out / site.name, args.preset, seed=args.seed + k)
        print(f"{site.name}: {paths['dicom']} ({len(list(paths['dicom'].glob('*.dcm')))} files), {paths['dxa']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
