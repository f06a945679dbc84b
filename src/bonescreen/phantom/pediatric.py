"""Pediatric mode of the phantom: children 0-17, growth, Z-scores, chronic disease.

Generative model (one site with ``SiteSpec(pediatric=True)``):

* sex and age; a chronic-disease ``burden`` (0 for healthy children, a
  half-normal severity for the ``DISEASE_FRAC`` who are ill: hemato-oncologic
  and inflammatory disease, as in the study's population);
* height-for-age and BMI-for-age Z-scores (growth is stunted and weight is
  lower with disease) -> height and weight from smooth growth references;
* latent bone density ``L`` = **true skeletal BMD Z-score** against age- and
  sex-matched references: healthy children are N(0, 1) by construction, and
  the disease burden (scaled so the site reaches ``SiteSpec.prevalence``
  low BMD) and small growth effects pull it down;
* measured lumbar-spine Z = ``L`` + spine-vs-skeleton deviation + DXA
  calibration + precision noise, rounded to 0.1; low BMD is Z <= -2.0
  (:func:`bonescreen.labels.pediatric_low_bmd`); lumbar aBMD (g/cm^2) is the
  reference mean + Z x reference SD at the child's age and sex.

The radiograph shows the skeleton's *absolute* mineral (what a young child
has is far below an adult's even at Z = 0), so turning the image into a
Z-score needs age and sex: that is why the model gets the clinical variables.
Because (age, sex, image) determine ``L``, the oracle is ``L`` itself: its
AUC for measured low BMD and its Pearson r with the measured Z.

Hand-written growth and BMD curves: smooth approximations of published
pediatric references (WHO/CDC height and BMI; GE Lunar-like L1-L4 aBMD), close
enough for a phantom, not for clinical use.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.labels import PEDIATRIC_LOW_Z
from bonescreen.phantom.anatomy import DENSITY_PER_SD
from bonescreen.phantom.common import (
    PatientRecord,
    PhantomError,
    SitePlan,
    SiteSpec,
    Table,
    auc_or_none,
    cxr_count,
    demographics,
    dxa_dates,
    fmt_number,
    patient_rng,
    plan_radiographs,
    seeded_rng,
    site_code,
    site_summary,
    truncnorm,
)
from bonescreen.phantom.vendors import VendorProfile

DISEASE_FRAC = 0.65  # children in a tertiary referral population with a chronic disease
HAZ_PER_BURDEN = 0.6  # height-for-age Z lost per unit of disease burden
BMIZ_PER_BURDEN = 0.4  # BMI-for-age Z lost per unit of disease burden
HAZ_EFFECT = 0.20  # latent Z per height-for-age Z (small, well-grown bones)
BMIZ_EFFECT = 0.15  # latent Z per BMI-for-age Z (mechanical loading)
LATENT_NOISE_SD = math.sqrt(1.0 - HAZ_EFFECT**2 - BMIZ_EFFECT**2)  # healthy: Z ~ N(0, 1)
SPINE_SD = 0.50  # lumbar spine vs whole-skeleton disagreement (Z units)
RHO_GAIN = 0.6  # skeleton mineral shown = 1 + gain * (BMD / young-adult BMD - 1)
YA_LUMBAR_BMD = 1.18  # young-adult lumbar aBMD (g/cm^2), the renderer's density 0
DXA_SITE = "lumbar_spine"

# growth references: ages and medians (height cm, BMI kg/m^2); hand-tabulated
_AGES = np.array([0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0])
_HEIGHT = {
    "M": np.array([50.0, 76.0, 87.0, 96.0, 110.0, 128.0, 138.0, 149.0, 164.0, 174.0, 176.0]),
    "F": np.array([49.0, 74.0, 86.0, 95.0, 109.0, 127.0, 138.0, 151.0, 160.0, 163.0, 163.5]),
}
_BMI = {
    "M": np.array([13.4, 17.2, 16.4, 15.9, 15.4, 15.8, 16.6, 17.9, 19.2, 20.5, 21.7]),
    "F": np.array([13.3, 16.6, 16.0, 15.6, 15.2, 15.8, 16.8, 18.1, 19.5, 20.6, 21.3]),
}
BMD_LOG_SD = 0.11  # aBMD spread (log scale): ~0.12 g/cm^2 at a young adult's 1.1
MAX_BURDEN = 2.0  # the sickest children: burden is a half-normal capped here
HEIGHT_CV = 0.043  # height SD / median
BMI_LOG_SD = 0.11  # BMI spread on the log scale


def height_reference(age: np.ndarray | float, sex: np.ndarray | str) -> tuple[np.ndarray, np.ndarray]:
    """Median and SD of height (cm) at ``age`` for ``sex`` ("F"/"M")."""
    age = np.asarray(age, dtype=float)
    female = np.asarray(sex) == "F"
    med = np.where(female, np.interp(age, _AGES, _HEIGHT["F"]), np.interp(age, _AGES, _HEIGHT["M"]))
    return med, HEIGHT_CV * med


def bmi_reference(age: np.ndarray | float, sex: np.ndarray | str) -> np.ndarray:
    """Median BMI (kg/m^2) at ``age`` for ``sex``."""
    age = np.asarray(age, dtype=float)
    female = np.asarray(sex) == "F"
    med: np.ndarray = np.where(female, np.interp(age, _AGES, _BMI["F"]), np.interp(age, _AGES, _BMI["M"]))
    return med


def bmd_reference(age: np.ndarray | float, sex: np.ndarray | str) -> np.ndarray:
    """Median lumbar-spine aBMD (g/cm^2) for age and sex: slow childhood gain, pubertal spurt.

    The spread is log-normal (``BMD_LOG_SD``), so a very low Z never gives a
    negative density in an infant.
    """
    age = np.asarray(age, dtype=float)
    female = np.asarray(sex) == "F"
    centre = np.where(female, 11.5, 13.5)  # puberty comes earlier in girls
    amp = np.where(female, 0.35, 0.33)
    return 0.30 + 0.028 * age + amp / (1.0 + np.exp(-(age - centre) / 1.5))


def bmd_to_z(bmd: np.ndarray | float, age: np.ndarray | float, sex: np.ndarray | str) -> np.ndarray:
    """Z-score of a lumbar aBMD against the age- and sex-matched reference."""
    z: np.ndarray = np.log(np.asarray(bmd, dtype=float) / bmd_reference(age, sex)) / BMD_LOG_SD
    return z


def z_to_bmd(z: np.ndarray | float, age: np.ndarray | float, sex: np.ndarray | str) -> np.ndarray:
    """Lumbar aBMD (g/cm^2) of a Z-score at ``age`` for ``sex`` (inverse of :func:`bmd_to_z`)."""
    return bmd_reference(age, sex) * np.exp(BMD_LOG_SD * np.asarray(z, dtype=float))


def image_density(z: np.ndarray | float, age: np.ndarray | float, sex: np.ndarray | str) -> np.ndarray:
    """Renderer density (adult T-score units) showing the child's absolute skeletal mineral.

    The adult renderer maps density d to mineral ``rho = 1 + 0.18 d``; here
    ``rho = 1 + RHO_GAIN (BMD / BMD_young_adult - 1)``, compressed so that an
    infant's skeleton stays inside the renderer's range.
    """
    rho = 1.0 + RHO_GAIN * (z_to_bmd(z, age, sex) / YA_LUMBAR_BMD - 1.0)
    return (rho - 1.0) / DENSITY_PER_SD


def field_of_view(vendor_fov_mm: float, height_cm: float) -> float:
    """A child's chest is collimated to its size: smaller field, in 20 mm steps (texture cache)."""
    frac = float(np.clip(height_cm / 170.0, 0.45, 1.0))
    return float(max(160.0, round(vendor_fov_mm * frac / 20.0) * 20.0))


# --- population ------------------------------------------------------------------------


def draw_children(spec: SiteSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sex, age, disease burden, growth and the latent Z before the burden effect."""
    female = rng.random(n) < spec.female_frac
    sex = np.where(female, "F", "M")
    age = truncnorm(rng, n, spec.age_mean, spec.age_sd, spec.age_min, spec.age_max)
    ill = rng.random(n) < DISEASE_FRAC
    burden = np.where(ill, np.minimum(np.abs(rng.normal(0.0, 1.0, n)), MAX_BURDEN), 0.0)
    haz = rng.normal(0.0, 1.0, n) - HAZ_PER_BURDEN * burden
    bmiz = rng.normal(0.0, 1.0, n) - BMIZ_PER_BURDEN * burden
    h_med, h_sd = height_reference(age, sex)
    height = np.clip(h_med + haz * h_sd, 40.0, 210.0)
    bmi = bmi_reference(age, sex) * np.exp(BMI_LOG_SD * bmiz)
    weight = bmi * (height / 100.0) ** 2
    # growth effects use the health-independent parts so healthy children are N(0, 1)
    latent0 = HAZ_EFFECT * (haz + HAZ_PER_BURDEN * burden) + BMIZ_EFFECT * (bmiz + BMIZ_PER_BURDEN * burden)
    latent0 = latent0 + rng.normal(0.0, LATENT_NOISE_SD, n)
    return {
        "female": female,
        "sex": sex,
        "age": age,
        "ill": ill,
        "burden": burden,
        "haz": haz,
        "bmiz": bmiz,
        "height": height,
        "weight": weight,
        "latent0": latent0,
    }


def measured_z(
    latent: np.ndarray, spec: SiteSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(true lumbar Z, measured lumbar Z rounded to 0.1) for each child."""
    n = len(latent)
    true = latent + rng.normal(0.0, SPINE_SD, n)
    meas = np.round(true + spec.dxa_offset + rng.normal(0.0, spec.dxa_noise, n), 1)
    return true, meas


def low_bmd(z: np.ndarray) -> np.ndarray:
    return np.round(z, 1) <= PEDIATRIC_LOW_Z


def _disease_effect(latent0: np.ndarray, burden: np.ndarray, k: float) -> np.ndarray:
    # the growth effects partly offset: the burden's net effect is k + growth loss
    return latent0 - k * burden - HAZ_EFFECT * HAZ_PER_BURDEN * burden - BMIZ_EFFECT * BMIZ_PER_BURDEN * burden


@lru_cache(maxsize=32)
def calibrated_burden_effect(spec: SiteSpec) -> float:
    """Latent Z lost per unit of disease burden so the site's low-BMD prevalence is ``spec.prevalence``.

    Fixed 20,000-child Monte Carlo sample, independent of the user seed (a
    site's population is a property of the site).
    """
    rng = seeded_rng(site_code(spec.name), 7_778)
    kids = draw_children(spec, 20_000, rng)
    noise_rng = seeded_rng(site_code(spec.name), 8_889)
    dev = noise_rng.normal(0.0, SPINE_SD, 20_000) + spec.dxa_offset + noise_rng.normal(0.0, spec.dxa_noise, 20_000)

    def prev(k: float) -> float:
        return float(low_bmd(_disease_effect(kids["latent0"], kids["burden"], k) + dev).mean())

    lo, hi = -2.0, 8.0  # prevalence rises with k
    if prev(hi) < spec.prevalence or prev(lo) > spec.prevalence:
        raise PhantomError(
            f"site {spec.name}: prevalence {spec.prevalence} is out of reach of the pediatric model "
            f"({prev(lo):.3f}..{prev(hi):.3f})"
        )
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if prev(mid) < spec.prevalence:
            lo = mid
        else:
            hi = mid
    return round(0.5 * (lo + hi), 4)


def build_site(spec: SiteSpec, n: int, seed: int) -> dict[str, Any]:
    """Every child of a site (vectorised): people, latent, DXA values, devices."""
    rng = seeded_rng(seed, site_code(spec.name), 0)
    kids = draw_children(spec, n, rng)
    k = calibrated_burden_effect(spec)
    latent = _disease_effect(kids["latent0"], kids["burden"], k)
    z_true, z_meas = measured_z(latent, spec, rng)
    device = rng.random(n) < spec.device_frac
    return {"kids": kids, "latent": latent, "z_true": z_true, "z_meas": z_meas, "device": device, "k": k, "rng": rng}


def patients(spec: SiteSpec, built: dict[str, Any]) -> list[PatientRecord]:
    """PatientRecords for the renderer: ``latent`` is the *image* density (absolute mineral)."""
    kids = built["kids"]
    dens = image_density(built["latent"], kids["age"], kids["sex"])
    return [
        PatientRecord(
            patient_id=f"{spec.name}-{i + 1:05d}",
            site=spec.name,
            index=i + 1,
            sex=str(kids["sex"][i]),
            age=round(float(kids["age"][i]), 2),
            height_cm=float(kids["height"][i]),
            weight_kg=float(kids["weight"][i]),
            latent=round(float(dens[i]), 4),
            device=bool(built["device"][i]),
            pediatric=True,
        )
        for i in range(len(built["latent"]))
    ]


TRUTH_COLUMNS = [
    "patient_id",
    "site",
    "sex",
    "age",
    "height_cm",
    "weight_kg",
    "bmi",
    "height_z",
    "bmi_z",
    "chronic_disease",
    "burden",
    "latent",
    "image_density",
    "bmd_skeleton",
    "z_true_lumbar_spine",
    "z_lumbar_spine",
    "bmd_lumbar_spine",
    "low_bmd",
    "dxa_date",
    "n_images",
]
DXA_COLUMNS = [
    "patient_id",
    "exam_date",
    "sex",
    "age",
    "z_lumbar_spine",
    "bmd_lumbar_spine",
    "height_cm",
    "weight_kg",
    "device",
]


def plan_site(spec: SiteSpec, n: int, out: Path, size: int, seed: int) -> SitePlan:
    """Images, adult-format truth rows, pediatric truth rows, DXA rows and the oracle of one site."""
    built = build_site(spec, n, seed)
    kids = built["kids"]
    dates = dxa_dates(spec, built["rng"], n)
    built["bmd_meas"] = z_to_bmd(built["z_meas"], kids["age"], kids["sex"])
    built["bmd_skel"] = z_to_bmd(built["latent"], kids["age"], kids["sex"])
    built["low"] = low_bmd(built["z_meas"])
    jobs: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    ped_truth: list[dict[str, Any]] = []
    rows: list[dict[str, str]] = []
    records = patients(spec, built)
    for i, p in enumerate(records):
        prng = patient_rng(seed, spec.name, p.index)
        dxa_date = dates[i]
        birth = dxa_date - dt.timedelta(days=round(p.age * 365.25))
        n_frontal = cxr_count(spec, prng)
        p_jobs = plan_radiographs(
            p, spec, prng, dxa_date, birth, n_frontal, out, size, seed, skip_before_birth=True
        )
        jobs += p_jobs
        truth.append(truth_row(p, i, built, dxa_date, len(p_jobs)))
        ped_truth.append(pediatric_truth_row(p, i, built, dxa_date, len(p_jobs)))
        rows.append(dxa_row(spec, p, i, built, dxa_date))
    oracle = site_oracle(built["latent"], built["z_meas"], built["bmd_skel"], built["bmd_meas"])
    oracle.update({"n_patients": n, "n_images": len(jobs), "label_type": "z_score"})
    return SitePlan(
        name=spec.name,
        population="pediatric",
        spec=spec,
        patients=records,
        jobs=jobs,
        truth=truth,
        dxa=Table("dxa.csv", DXA_COLUMNS, rows),
        oracle=oracle,
        summary=site_summary(spec, "z_score", n, len(jobs), len(rows), burden_effect=built["k"]),
        extra_truth=Table("truth_pediatric.csv", TRUTH_COLUMNS, ped_truth),
    )


def truth_row(p: PatientRecord, i: int, built: dict[str, Any], dxa_date: dt.date, n_images: int) -> dict[str, Any]:
    """A child's row of the shared truth.csv (no T-scores; ``label`` is measured low BMD)."""
    return {
        **demographics(p),
        "label_type": "z_score",
        "latent": fmt_number(float(built["latent"][i]), 4),
        "label": int(built["low"][i]),
        "dxa_date": dxa_date.isoformat(),
        "has_dxa": 1,
        "n_images": n_images,
        "device": int(p.device),
        "defect": "",
    }


def pediatric_truth_row(
    p: PatientRecord, i: int, built: dict[str, Any], dxa_date: dt.date, n_images: int
) -> dict[str, Any]:
    """A child's row of truth_pediatric.csv: growth, disease, true and measured Z and BMD."""
    kids = built["kids"]
    return {
        **demographics(p),
        "height_z": fmt_number(float(kids["haz"][i]), 3),
        "bmi_z": fmt_number(float(kids["bmiz"][i]), 3),
        "chronic_disease": int(kids["ill"][i]),
        "burden": fmt_number(float(kids["burden"][i]), 3),
        "latent": fmt_number(float(built["latent"][i]), 4),
        "image_density": fmt_number(p.latent, 4),
        "bmd_skeleton": fmt_number(float(built["bmd_skel"][i]), 4),
        "z_true_lumbar_spine": fmt_number(float(built["z_true"][i]), 3),
        "z_lumbar_spine": fmt_number(float(built["z_meas"][i])),
        "bmd_lumbar_spine": fmt_number(float(built["bmd_meas"][i]), 3),
        "low_bmd": int(built["low"][i]),
        "dxa_date": dxa_date.isoformat(),
        "n_images": n_images,
    }


def dxa_row(spec: SiteSpec, p: PatientRecord, i: int, built: dict[str, Any], dxa_date: dt.date) -> dict[str, str]:
    """A child's DXA export row (``DXA_COLUMNS``): lumbar-spine Z and aBMD only."""
    return {
        "patient_id": p.patient_id,
        "exam_date": dxa_date.isoformat(),
        "sex": p.sex,
        # children's ages matter to the month: one decimal, not whole years
        "age": fmt_number(math.floor(p.age * 10) / 10, 1),
        "z_lumbar_spine": fmt_number(float(built["z_meas"][i])),
        "bmd_lumbar_spine": fmt_number(float(built["bmd_meas"][i]), 3),
        "height_cm": fmt_number(p.height_cm),
        "weight_kg": fmt_number(p.weight_kg),
        "device": spec.dxa_device,
    }


def model_description() -> dict[str, Any]:
    """The pediatric model's parameters, as phantom.json records them under "model"/"pediatric"."""
    return {
        "disease_frac": DISEASE_FRAC,
        "spine_sd": SPINE_SD,
        "rho_gain": RHO_GAIN,
        "oracle": "latent = true skeletal Z: AUC of -latent for measured Z <= -2, Pearson r with measured Z",
    }


def site_oracle(
    latent: np.ndarray, z_meas: np.ndarray, bmd_skel: np.ndarray, bmd_meas: np.ndarray
) -> dict[str, Any]:
    """AUC of the latent for measured low BMD and the best achievable correlations."""
    low = low_bmd(z_meas).astype(int)
    r = float(np.corrcoef(latent, z_meas)[0, 1]) if len(latent) > 2 else None
    r_bmd = float(np.corrcoef(bmd_skel, bmd_meas)[0, 1]) if len(latent) > 2 else None
    return {
        "auc": auc_or_none(low, -np.asarray(latent)),
        "r": None if r is None else round(r, 4),
        "r_bmd": None if r_bmd is None else round(r_bmd, 4),
        "mae_z": round(float(np.mean(np.abs(latent - z_meas))), 4),
        "n": len(latent),
        "prevalence": round(float(low.mean()), 4) if len(low) else None,
        "n_low_bmd": int(low.sum()),
        "n_normal": int((low == 0).sum()),
        "threshold_z": PEDIATRIC_LOW_Z,
    }


# A pediatric DR room: smaller detector field, AP for the youngest.
PEDIATRIC_VENDOR = VendorProfile(
    name="ped_dr",
    manufacturer="Phantom Imaging",
    model="PX-DR Peds",
    modality="DX",
    bits_stored=12,
    photometric="MONOCHROME2",
    response="log",
    voi_window=True,
    rescale=(1.0, 0.0),
    marker="R",
    fov_mm=380.0,
)

# PED (development, tertiary children's hospital) and PED_EXT (external, CR room, MONOCHROME1):
# median age ~13, ~25 % low BMD, CXR and DXA within three months.
PEDIATRIC_SITES: tuple[SiteSpec, ...] = (
    SiteSpec(
        name="PED",
        role="development",
        pediatric=True,
        age_mean=12.5,
        age_sd=4.0,
        age_min=0.0,
        age_max=17.99,
        female_frac=0.48,
        prevalence=0.25,
        vendors=(PEDIATRIC_VENDOR,),
        ap_frac=0.30,
        lateral_frac=0.05,
        device_frac=0.03,  # central lines / ports
        cxr_count_probs=(0.6, 0.3, 0.1),
        window_probs=(0.5, 0.5, 0.0, 0.0),
        date_start="2012-01-01",
        date_end="2023-12-31",
        dxa_device="GE Lunar iDXA",
        dxa_noise=0.12,
    ),
    SiteSpec(
        name="PED_EXT",
        role="external",
        pediatric=True,
        age_mean=12.0,
        age_sd=4.5,
        age_min=0.0,
        age_max=17.99,
        female_frac=0.5,
        prevalence=0.27,
        vendors=(
            VendorProfile(
                name="pedext_cr",
                manufacturer="Acme Medical",
                model="CR-30 Peds",
                modality="CR",
                bits_stored=10,
                photometric="MONOCHROME1",
                response="linear",
                exposure=0.8,
                detail_gain=1.3,
                collimation=0.05,
                collimation_fill="black",
                marker="L",
                fov_mm=360.0,
            ),
        ),
        ap_frac=0.4,
        lateral_frac=0.05,
        device_frac=0.03,
        cxr_count_probs=(0.7, 0.3, 0.0),
        window_probs=(0.4, 0.6, 0.0, 0.0),
        date_start="2016-01-01",
        date_end="2023-12-31",
        dxa_device="Hologic Horizon",
        dxa_offset=-0.05,
        dxa_noise=0.15,
    ),
)


def default_pediatric_vendor() -> VendorProfile:
    """A pediatric DR room: smaller detector field, AP for the youngest."""
    return PEDIATRIC_VENDOR


def default_pediatric_sites() -> list[SiteSpec]:
    """PED (development, tertiary children's hospital) and PED_EXT (external, CR room, MONOCHROME1).

    Median age ~13, ~25 % low BMD, CXR and DXA within three months.
    """
    return list(PEDIATRIC_SITES)
