"""The adult population planner: patients, DXA exports and their radiographs' jobs.

Generative model (adult):

* sex, age, height and weight per site;
* latent bone density ``L`` (T-score units) = site intercept + age/sex/BMI
  effects + individual variation;
* true T-score at each DXA site = ``L`` + skeletal-site offset + site-specific
  biological deviation (spine and hip disagree in real patients);
* measured T-score = true + DXA device calibration + precision noise, rounded
  to one decimal as exports are; the WHO category uses the lowest of the three.

The radiograph carries ``L`` only (through the bones), so the stage-2 label is
a noisy function of what the image shows: the per-site "oracle" AUC of
``-L`` against the measured label is the ceiling any image model can reach.
Because the skeletal-site offsets do not depend on age or sex, the Bayes
posterior given (``L``, age, sex) is monotone in ``L`` and has the same AUC.

Each site's intercept is calibrated (on a fixed Monte Carlo sample) so that
its expected stage-2 prevalence (low bone mass among non-osteoporotic
patients) matches ``SiteSpec.prevalence``.

:func:`plan_site` (labelled sites) and :func:`plan_pool` (the unlabelled
pool) return a :class:`~bonescreen.phantom.common.SitePlan`.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.labels import NORMAL_MIN_T, OSTEOPOROSIS_MAX_T
from bonescreen.phantom.common import (
    DXA_SITES,
    PatientRecord,
    PhantomError,
    PoolSpec,
    SitePlan,
    SiteSpec,
    Table,
    auc_or_none,
    cxr_count,
    demographics,
    dxa_dates,
    fmt_number,
    image_job,
    patient_rng,
    pick_vendor,
    plan_radiographs,
    seeded_rng,
    site_code,
    site_summary,
    truncnorm,
)

__all__ = [
    "SITE_OFFSETS",
    "SITE_SD",
    "LATENT_SD",
    "BMD_REFERENCE",
    "MESSY_DEFECTS",
    "draw_people",
    "dxa_scores",
    "who_categories",
    "stage2_prevalence",
    "calibrated_intercept",
    "build_site",
    "patients",
    "assign_defects",
    "plan_site",
    "site_oracle",
    "plan_pool",
    "dxa_rows",
    "dxa_columns",
    "truth_row",
    "model_description",
]

# skeletal-site offsets from the latent (T-score units) and their biological
# spread: the femoral neck usually reads lowest, the total hip highest.
SITE_OFFSETS = {"lumbar_spine": 0.10, "femoral_neck": -0.25, "total_hip": 0.20}
SITE_SD = 0.60
LATENT_SD = 0.85
# young-adult reference (GE Lunar-like), g/cm^2: (mean, sd) by sex
BMD_REFERENCE = {
    "F": {"lumbar_spine": (1.180, 0.120), "femoral_neck": (0.980, 0.120), "total_hip": (1.000, 0.120)},
    "M": {"lumbar_spine": (1.180, 0.130), "femoral_neck": (1.040, 0.130), "total_hip": (1.050, 0.140)},
}
MESSY_DEFECTS = (
    "duplicate_row",
    "t_score_text",
    "impossible_t_score",
    "date_format",
    "dxa_without_cxr",
    "cxr_without_dxa",
)


def model_description() -> dict[str, Any]:
    """The adult model's parameters, as phantom.json records them under "model"."""
    return {
        "latent_sd": LATENT_SD,
        "site_offsets": SITE_OFFSETS,
        "site_sd": SITE_SD,
        "bmd_reference": BMD_REFERENCE,
        "oracle": "AUC of -latent against the measured stage-2 label (osteoporosis excluded)",
    }


# --- population model -----------------------------------------------------------

def draw_people(spec: SiteSpec | PoolSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sex, age, height, weight and the latent (before the site intercept)."""
    female = rng.random(n) < spec.female_frac
    age = truncnorm(rng, n, spec.age_mean, spec.age_sd, spec.age_min, spec.age_max)
    height = np.where(female, rng.normal(158.0, 6.5, n), rng.normal(171.0, 7.0, n))
    height = height - 0.08 * np.clip(age - 50.0, 0.0, None)  # stoop and vertebral height loss
    bmi = np.clip(np.exp(rng.normal(math.log(24.5), 0.14, n)), 16.0, 45.0)
    weight = bmi * (height / 100.0) ** 2
    # bone loss with age, faster after menopause; heavier people carry more bone
    latent_mean = np.where(female, -0.045 * (age - 50.0) - 0.25, -0.020 * (age - 50.0)) + 0.04 * (bmi - 24.5)
    latent = latent_mean + rng.normal(0.0, LATENT_SD, n)
    return {
        "female": female,
        "age": age,
        "height": np.round(height, 1),
        "weight": np.round(weight, 1),
        "bmi": bmi,
        "latent0": latent,
    }


def dxa_scores(
    latent: np.ndarray, spec_offset: float, noise: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """True and measured (rounded) T-scores at the three DXA sites."""
    n = latent.shape[0]
    out: dict[str, np.ndarray] = {}
    for site in DXA_SITES:
        true = latent + SITE_OFFSETS[site] + rng.normal(0.0, SITE_SD, n)
        measured = true + spec_offset + rng.normal(0.0, noise, n)
        out[f"t_true_{site}"] = true
        out[f"t_{site}"] = np.round(measured, 1)
    out["t_min"] = np.min(np.stack([out[f"t_{s}"] for s in DXA_SITES]), axis=0)
    return out


def who_categories(t_min: np.ndarray) -> np.ndarray:
    return np.where(
        t_min >= NORMAL_MIN_T, "normal", np.where(t_min <= OSTEOPOROSIS_MAX_T, "osteoporosis", "low_bone_mass")
    )


def stage2_prevalence(cat: np.ndarray) -> float:
    lbm = float(np.sum(cat == "low_bone_mass"))
    nor = float(np.sum(cat == "normal"))
    return lbm / max(lbm + nor, 1.0)


@lru_cache(maxsize=64)
def calibrated_intercept(spec: SiteSpec | PoolSpec, name: str) -> float:
    """Intercept that gives ``spec.prevalence`` on a fixed 20,000-person sample.

    Depends only on the spec (not the user seed): a site's population is a
    property of the site.
    """
    rng = seeded_rng(site_code(name), 7_777)
    people = draw_people(spec, 20_000, rng)
    offset = getattr(spec, "dxa_offset", 0.0)
    noise = getattr(spec, "dxa_noise", 0.12)
    scores = dxa_scores(np.zeros(20_000), offset, noise, seeded_rng(site_code(name), 8_888))
    # t_min(b) = min over sites of (latent0 + b + site terms): rounding aside, shift only
    base = np.stack([scores[f"t_true_{s}"] for s in DXA_SITES]) + people["latent0"]
    meas_noise = np.stack([scores[f"t_{s}"] - scores[f"t_true_{s}"] for s in DXA_SITES])

    def prev(b: float) -> float:
        t = np.round(base + b + meas_noise, 1).min(axis=0)
        return stage2_prevalence(who_categories(t))

    lo, hi = -6.0, 6.0  # prevalence falls as the intercept rises
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if prev(mid) > spec.prevalence:
            lo = mid
        else:
            hi = mid
    return round(0.5 * (lo + hi), 4)


def build_site(spec: SiteSpec | PoolSpec, name: str, n: int, seed: int) -> dict[str, Any]:
    """Draw every patient of a site (vectorised) and plan their radiographs."""
    code = site_code(name)
    rng = seeded_rng(seed, code, 0)
    people = draw_people(spec, n, rng)
    b0 = calibrated_intercept(spec, name)
    latent = people["latent0"] + b0
    offset = getattr(spec, "dxa_offset", 0.0)
    noise = getattr(spec, "dxa_noise", 0.12)
    scores = dxa_scores(latent, offset, noise, rng)
    cat = who_categories(scores["t_min"])
    device = rng.random(n) < spec.device_frac
    return {
        "people": people,
        "latent": latent,
        "scores": scores,
        "category": cat,
        "device": device,
        "b0": b0,
        "rng": rng,
    }


def patients(name: str, built: dict[str, Any]) -> list[PatientRecord]:
    ppl = built["people"]
    prefix = "POOL" if name == "pool" else name
    out = []
    for i in range(len(built["latent"])):
        out.append(
            PatientRecord(
                patient_id=f"{prefix}-{i + 1:05d}",
                site=name,
                index=i + 1,
                sex="F" if ppl["female"][i] else "M",
                age=round(float(ppl["age"][i]), 2),
                height_cm=float(ppl["height"][i]),
                weight_kg=float(ppl["weight"][i]),
                latent=round(float(built["latent"][i]), 4),
                device=bool(built["device"][i]),
            )
        )
    return out

# --- the plan -----------------------------------------------------------------------


def assign_defects(spec: SiteSpec, rng: np.random.Generator, dates: list[dt.date]) -> dict[int, str]:
    """Messy-export defects (``MESSY_DEFECTS``), each on its own patient; ``dates`` may change.

    The patient whose DXA date is reformatted gets an unambiguous day (> 12).
    """
    n = len(dates)
    defect_of: dict[int, str] = {}
    if spec.messy and n >= len(MESSY_DEFECTS) + 2:
        chosen = rng.choice(n, size=len(MESSY_DEFECTS), replace=False)
        for kind, i in zip(MESSY_DEFECTS, chosen, strict=True):
            defect_of[int(i)] = kind
        i_date = next(i for i, kd in defect_of.items() if kd == "date_format")
        d = dates[i_date]
        if d.day <= 12:
            dates[i_date] = d.replace(day=13 + (d.day % 15))
    return defect_of


def plan_site(spec: SiteSpec, n: int, out: Path, size: int, seed: int) -> SitePlan:
    """Images, truth rows, DXA export rows, defects and the oracle of one adult site."""
    built = build_site(spec, spec.name, n, seed)
    records = patients(spec.name, built)
    scores, cat = built["scores"], built["category"]
    dates = dxa_dates(spec, built["rng"], n)
    defect_of = assign_defects(spec, built["rng"], dates)
    jobs: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    rows: list[dict[str, str]] = []
    defects: list[dict[str, str]] = []
    for i, p in enumerate(records):
        prng = patient_rng(seed, spec.name, p.index)
        dxa_date = dates[i]
        birth = dxa_date - dt.timedelta(days=int(round(p.age * 365.25)))
        defect = defect_of.get(i, "")
        n_frontal = 0 if defect == "dxa_without_cxr" else cxr_count(spec, prng)
        p_jobs = plan_radiographs(p, spec, prng, dxa_date, birth, n_frontal, out, size, seed)
        jobs += p_jobs
        has_dxa = defect != "cxr_without_dxa"
        c = str(cat[i])
        truth.append(
            truth_row(p, spec.name, spec.label_type, scores, i, c, dxa_date.isoformat(), has_dxa, len(p_jobs), defect)
        )
        if has_dxa:
            rows += dxa_rows(spec, p, i, dxa_date, scores, c, defect)
        if defect:
            defects.append({"site": spec.name, "patient_id": p.patient_id, "defect": defect})
    oracle = site_oracle(truth)
    oracle.update({"label_type": spec.label_type, "n_patients": n, "n_images": len(jobs)})
    return SitePlan(
        name=spec.name,
        population="adult",
        spec=spec,
        patients=records,
        jobs=jobs,
        truth=truth,
        dxa=Table("dxa.csv", dxa_columns(spec), rows),
        oracle=oracle,
        summary=site_summary(spec, spec.label_type, n, len(jobs), len(rows), intercept=built["b0"]),
        defects=defects,
    )


def site_oracle(truth: list[dict[str, Any]]) -> dict[str, Any]:
    """AUC of ``-latent`` for the measured stage-2 (and stage-1) label among patients with a DXA."""
    lab = [(r["label"], float(r["latent"])) for r in truth if r["has_dxa"] and r["label"] != ""]
    y = np.array([int(a) for a, _ in lab], dtype=int)
    lat = np.array([b for _, b in lab], dtype=float)
    with_dxa = [r for r in truth if r["has_dxa"]]
    st1 = np.array([int(r["label_stage1"]) for r in with_dxa], dtype=int)
    lat1 = np.array([float(r["latent"]) for r in with_dxa], dtype=float)
    return {
        "auc": auc_or_none(y, -lat),
        "n": int(y.size),
        "prevalence": round(float(y.mean()), 4) if y.size else None,
        "n_normal": int((y == 0).sum()),
        "n_low_bone_mass": int((y == 1).sum()),
        "n_osteoporosis": int(st1.sum()),
        "auc_stage1": auc_or_none(st1, -lat1),
    }


def dxa_rows(
    spec: SiteSpec, p: PatientRecord, i: int, dxa_date: dt.date, scores: dict[str, np.ndarray], cat: str, defect: str
) -> list[dict[str, str]]:
    """The export row(s) of one patient, with this patient's defect applied."""
    age_years = int(math.floor(p.age))
    row: dict[str, str] = {
        "patient_id": p.patient_id,
        "exam_date": dxa_date.strftime("%m/%d/%Y") if defect == "date_format" else dxa_date.isoformat(),
        "sex": p.sex,
        "age": str(age_years),
    }
    if spec.label_type == "t_score":
        for s in DXA_SITES:
            t = float(scores[f"t_{s}"][i])
            mean, sd = BMD_REFERENCE[p.sex][s]
            expected = (-0.035 if p.sex == "F" else -0.015) * max(p.age - 30.0, 0.0)
            row[f"t_{s}"] = fmt_number(t)
            row[f"z_{s}"] = fmt_number(round(t - expected, 1))
            row[f"bmd_{s}"] = fmt_number(mean + t * sd, 3)
        if defect == "t_score_text":
            row["t_femoral_neck"] = "see report"
        if defect == "impossible_t_score":
            row["t_lumbar_spine"] = "15.0"
    row["height_cm"] = fmt_number(p.height_cm)
    row["weight_kg"] = fmt_number(p.weight_kg)
    row["category"] = cat
    row["device"] = spec.dxa_device
    return [row, dict(row)] if defect == "duplicate_row" else [row]


def dxa_columns(spec: SiteSpec) -> list[str]:
    cols = ["patient_id", "exam_date", "sex", "age"]
    if spec.label_type == "t_score":
        cols += [f"t_{s}" for s in DXA_SITES] + [f"z_{s}" for s in DXA_SITES] + [f"bmd_{s}" for s in DXA_SITES]
    return cols + ["height_cm", "weight_kg", "category", "device"]


def plan_pool(spec: PoolSpec, n: int, out: Path, size: int, seed: int) -> SitePlan:
    """One image per pool patient; truth keeps the hidden latent and would-be labels."""
    if not spec.vendors:
        raise PhantomError("the pool needs at least one vendor profile")
    built = build_site(spec, "pool", n, seed)
    scores, cat = built["scores"], built["category"]
    jobs, truth = [], []
    start = dt.date(2008, 1, 1)
    records = patients("pool", built)
    for i, p in enumerate(records):
        prng = patient_rng(seed, "pool", p.index)
        day = start + dt.timedelta(days=int(prng.integers(0, 365 * 12)))
        birth = day - dt.timedelta(days=int(round(p.age * 365.25)))
        u = prng.random()
        view = "LAT" if u < spec.lateral_frac else ("AP" if u < spec.lateral_frac + spec.ap_frac else "PA")
        jobs.append(image_job(p, 0, view, pick_vendor(spec, prng), day, birth, 0, 1, None, out, size, seed, prng))
        truth.append(truth_row(p, "pool", "hidden", scores, i, str(cat[i]), "", False, 1, ""))
    return SitePlan(name="pool", population="pool", spec=spec, patients=records, jobs=jobs, truth=truth)


def truth_row(
    p: PatientRecord,
    site: str,
    label_type: str,
    scores: dict[str, np.ndarray],
    i: int,
    c: str,
    dxa_date: str,
    has_dxa: bool,
    n_images: int,
    defect: str,
) -> dict[str, Any]:
    """One row of truth.csv: demographics, the latent, true and measured T-scores, labels."""
    return {
        **demographics(p),
        "site": site,
        "label_type": label_type,
        "latent": fmt_number(p.latent, 4),
        **{f"t_true_{s}": fmt_number(float(scores[f"t_true_{s}"][i]), 3) for s in DXA_SITES},
        **{f"t_{s}": fmt_number(float(scores[f"t_{s}"][i])) for s in DXA_SITES},
        "t_min": fmt_number(float(scores["t_min"][i])),
        "category": c,
        "label": "" if c == "osteoporosis" else str(int(c == "low_bone_mass")),
        "label_stage1": int(c == "osteoporosis"),
        "dxa_date": dxa_date,
        "has_dxa": int(has_dxa),
        "n_images": n_images,
        "device": int(p.device),
        "defect": defect,
    }
