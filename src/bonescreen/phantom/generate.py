"""The phantom cohort: patients, DXA exports, radiographs and the known truth.

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
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.labels import NORMAL_MIN_T, OSTEOPOROSIS_MAX_T
from bonescreen.phantom.anatomy import Acquisition, anatomy_from_patient, render_layers
from bonescreen.phantom.common import (
    PatientRecord,
    PhantomError,
    PoolSpec,
    SiteSpec,
    auc_or_none,
    fmt_number,
    image_job,
    iso_date,
    pick_vendor,
    seeded_rng,
    site_code,
    truncnorm,
    window_days,
)
from bonescreen.phantom.vendors import VendorProfile, detect, dicom_dataset, write_dicom

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DXA_SITES = ("lumbar_spine", "femoral_neck", "total_hip")
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
PATIENT_STREAM = 1_000_000  # generator stream id for patient-level (anatomy) draws
MESSY_DEFECTS = (
    "duplicate_row",
    "t_score_text",
    "impossible_t_score",
    "date_format",
    "dxa_without_cxr",
    "cxr_without_dxa",
)


# --- default sites ----------------------------------------------------------------


def _dev_vendor() -> VendorProfile:
    return VendorProfile(
        name="dev_dr",
        manufacturer="Phantom Imaging",
        model="PX-DR 1",
        modality="DX",
        bits_stored=12,
        photometric="MONOCHROME2",
        response="log",
        voi_window=True,
        rescale=(1.0, 0.0),
        marker="R",
    )


def default_sites() -> list[SiteSpec]:
    """Development site plus four external sites: the paper's three and a far one.

    DEV: health-screening population (50-65), same-day CXR and DXA, messy export.
    EXT_A: similar ages, another vendor (CR, 10-bit, MONOCHROME1, linear, RLE).
    EXT_B: older veterans-like population, two systems, laterals and AP views.
    EXT_C: older, category labels only (no T-scores), JPEG 2000, 180-day pairing.
    FAR: the vendor look farthest from DEV's, an old inpatient population
    (:func:`far_site`). Sites are generated independently (every draw is keyed
    by the site's name), so adding FAR left the other sites' files unchanged.
    """
    return [
        SiteSpec(
            name="DEV",
            role="development",
            age_mean=56.0,
            age_sd=5.5,
            age_min=45.0,
            age_max=80.0,
            female_frac=0.55,
            prevalence=0.42,
            vendors=(_dev_vendor(),),
            ap_frac=0.02,
            lateral_frac=0.10,
            device_frac=0.01,
            window_probs=(0.65, 0.2, 0.1, 0.05),
            date_start="2012-01-01",
            date_end="2019-02-28",
            messy=True,
        ),
        SiteSpec(
            name="EXT_A",
            age_mean=58.0,
            age_sd=8.0,
            age_min=40.0,
            age_max=87.0,
            female_frac=0.6,
            prevalence=0.33,
            vendors=(
                VendorProfile(
                    name="exta_cr",
                    manufacturer="Acme Medical",
                    model="CR-30",
                    modality="CR",
                    bits_stored=10,
                    photometric="MONOCHROME1",
                    response="linear",
                    exposure=0.7,
                    scatter=0.08,
                    detail_gain=1.3,
                    range_compression=0.85,
                    collimation=0.06,
                    collimation_fill="black",
                    marker="L",
                    rescale=(2.0, -1024.0),
                    transfer_syntax="rle",
                    fov_mm=420.0,
                ),
            ),
            ap_frac=0.05,
            lateral_frac=0.10,
            window_probs=(0.4, 0.4, 0.15, 0.05),
            date_start="2022-08-01",
            date_end="2023-07-31",
            dxa_device="Osteosys Primus",
            dxa_offset=-0.10,
            dxa_noise=0.15,
        ),
        SiteSpec(
            name="EXT_B",
            age_mean=71.0,
            age_sd=7.5,
            age_min=50.0,
            age_max=98.0,
            female_frac=0.25,
            prevalence=0.45,
            vendors=(
                VendorProfile(
                    name="extb_dr",
                    manufacturer="Northwind Radiography",
                    model="NW Digital 9",
                    modality="DX",
                    bits_stored=16,
                    photometric="MONOCHROME2",
                    response="log",
                    detail_gain=2.0,
                    range_compression=0.6,
                    voi_window=True,
                    marker="both",
                    fov_mm=400.0,
                ),
                VendorProfile(
                    name="extb_cr",
                    manufacturer="Northwind Radiography",
                    model="NW CR 2",
                    modality="CR",
                    bits_stored=14,
                    photometric="MONOCHROME1",
                    response="log",
                    exposure=0.8,
                    detail_gain=1.4,
                    collimation=0.05,
                    lateral_label="LAT",
                    fov_mm=380.0,
                ),
            ),
            vendor_weights=(0.6, 0.4),
            ap_frac=0.15,
            lateral_frac=0.30,
            device_frac=0.05,
            window_probs=(0.15, 0.45, 0.3, 0.1),
            date_start="2012-10-01",
            date_end="2022-10-31",
        ),
        SiteSpec(
            name="EXT_C",
            label_type="category",
            age_mean=68.0,
            age_sd=8.5,
            age_min=50.0,
            age_max=95.0,
            female_frac=0.7,
            prevalence=0.45,
            vendors=(
                VendorProfile(
                    name="extc_dr",
                    manufacturer="Globex Imaging",
                    model="GX-Flat 43",
                    modality="DX",
                    bits_stored=15,
                    photometric="MONOCHROME2",
                    response="log",
                    exposure=1.2,
                    detail_gain=1.8,
                    range_compression=0.65,
                    rescale=(0.5, 0.0),
                    transfer_syntax="j2k",
                    marker=None,
                    fov_mm=430.0,
                ),
            ),
            ap_frac=0.08,
            lateral_frac=0.10,
            window_probs=(0.3, 0.35, 0.3, 0.05),
            date_start="2015-01-01",
            date_end="2023-12-31",
            dxa_device="unknown",
            dxa_noise=0.15,
        ),
        far_site(),
    ]


def far_vendor() -> VendorProfile:
    """The radiography system that differs most from DEV's (``_dev_vendor``) on every axis.

    A bedside CR reader without a grid: MONOCHROME1 at 10 bits, a strongly
    curved linear (dose) response instead of DEV's log one, heavy multi-scale
    processing (detail gain 2.8 and range compression 0.45 against DEV's 1.6
    and 0.7), a third of the fluence and three times the electronic noise,
    more scatter, a blurrier plate over a larger field (the chest fills less
    of the image; coarser pixels), wide black collimation, both lead markers
    always and a burned-in text line, no VOI window and no rescale.
    """
    return VendorProfile(
        name="far_cr",
        manufacturer="Farland Medical",
        model="FL-CR 8 Bedside",
        modality="CR",
        bits_stored=10,
        photometric="MONOCHROME1",
        response="linear",
        linear_k=1.2,
        exposure=0.35,
        electronic_noise=0.006,
        scatter=0.15,
        blur_mm=1.2,
        detail_gain=2.8,
        range_compression=0.45,
        fov_mm=480.0,
        range_percentiles=(0.5, 85.0),
        collimation=0.11,
        collimation_fill="black",
        marker="both",
        marker_prob=1.0,
        annotation="FARLAND GENERAL CR",
        lateral_label="LATERAL",
    )


def far_site() -> SiteSpec:
    """FAR: the external site farthest from DEV (vendor look, population, DXA device).

    Inpatient-heavy, old and mostly female (76 +- 8, 80 % women), higher
    prevalence (0.48), many AP and lateral views and devices, pairing up to
    180 days and more, another DXA device with a calibration offset.
    """
    return SiteSpec(
        name="FAR",
        age_mean=76.0,
        age_sd=8.0,
        age_min=55.0,
        age_max=99.0,
        female_frac=0.8,
        prevalence=0.48,
        vendors=(far_vendor(),),
        ap_frac=0.30,
        lateral_frac=0.20,
        device_frac=0.08,
        window_probs=(0.2, 0.4, 0.3, 0.1),
        date_start="2016-01-01",
        date_end="2024-06-30",
        dxa_device="Hologic Discovery",
        dxa_offset=0.15,
        dxa_noise=0.15,
    )


def default_pool() -> PoolSpec:
    """A mixed-vendor public-like pool: J2K, signed pixels, a view only named in the description."""
    return PoolSpec(
        vendors=(
            VendorProfile(
                name="pool_cr12",
                manufacturer="Public Archive A",
                model="CR",
                modality="CR",
                bits_stored=12,
                photometric="MONOCHROME2",
                transfer_syntax="j2k",
                detail_gain=1.5,
                fov_mm=410.0,
            ),
            VendorProfile(
                name="pool_dx_signed",
                manufacturer="Public Archive B",
                model="DX",
                modality="DX",
                bits_stored=12,
                pixel_representation=1,
                photometric="MONOCHROME2",
                response="linear",
                view_in_description_only=True,
                fov_mm=390.0,
            ),
            VendorProfile(
                name="pool_mono1",
                manufacturer="Public Archive C",
                model="CR",
                modality="CR",
                bits_stored=14,
                photometric="MONOCHROME1",
                detail_gain=2.2,
                range_compression=0.55,
                voi_window=True,
                marker="L",
                fov_mm=430.0,
            ),
        ),
        vendor_weights=(0.4, 0.3, 0.3),
    )


# --- population model -----------------------------------------------------------


def _draw_people(spec: SiteSpec | PoolSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
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


def _dxa_scores(
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


def _category(t_min: np.ndarray) -> np.ndarray:
    return np.where(
        t_min >= NORMAL_MIN_T, "normal", np.where(t_min <= OSTEOPOROSIS_MAX_T, "osteoporosis", "low_bone_mass")
    )


def _stage2_prevalence(cat: np.ndarray) -> float:
    lbm = float(np.sum(cat == "low_bone_mass"))
    nor = float(np.sum(cat == "normal"))
    return lbm / max(lbm + nor, 1.0)


@lru_cache(maxsize=64)
def _calibrated_intercept(spec: SiteSpec | PoolSpec, name: str) -> float:
    """Intercept that gives ``spec.prevalence`` on a fixed 20,000-person sample.

    Depends only on the spec (not the user seed): a site's population is a
    property of the site.
    """
    rng = seeded_rng(site_code(name), 7_777)
    people = _draw_people(spec, 20_000, rng)
    offset = getattr(spec, "dxa_offset", 0.0)
    noise = getattr(spec, "dxa_noise", 0.12)
    scores = _dxa_scores(np.zeros(20_000), offset, noise, seeded_rng(site_code(name), 8_888))
    # t_min(b) = min over sites of (latent0 + b + site terms): rounding aside, shift only
    base = np.stack([scores[f"t_true_{s}"] for s in DXA_SITES]) + people["latent0"]
    meas_noise = np.stack([scores[f"t_{s}"] - scores[f"t_true_{s}"] for s in DXA_SITES])

    def prev(b: float) -> float:
        t = np.round(base + b + meas_noise, 1).min(axis=0)
        return _stage2_prevalence(_category(t))

    lo, hi = -6.0, 6.0  # prevalence falls as the intercept rises
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if prev(mid) > spec.prevalence:
            lo = mid
        else:
            hi = mid
    return round(0.5 * (lo + hi), 4)


# --- patients and renders ------------------------------------------------------------


@dataclass
class RenderedImage:
    """One radiograph before it is written: stored pixels plus header facts."""

    stored: np.ndarray  # as written to PixelData (uint16 / int16)
    display: np.ndarray  # float32, bone bright, the vendor's processed image in [0, 1]
    attenuation: np.ndarray  # float32 line integrals, the physical truth
    bone_mask: np.ndarray  # bool, outline of every bone (independent of density)
    window: tuple[float, float] | None
    view: str
    vendor: VendorProfile
    spacing_mm: float
    kvp: float
    exposure_mas: float
    marker: str | None


def _acquisition(view: str, rng: np.random.Generator) -> Acquisition:
    ap = view == "AP"
    return Acquisition(
        view=view,
        shift_x=float(rng.normal(0.0, 8.0)),
        shift_y=float(rng.normal(0.0 if not ap else 10.0, 10.0)),
        magnification=float(rng.normal(1.08 if ap else 1.0, 0.03)),
        inspiration=float(rng.normal(-20.0 if ap else 0.0, 12.0)),
        rotation=float(rng.normal(0.0, 4.0)),
    )


def render_patient_image(
    patient: PatientRecord,
    *,
    view: str = "PA",
    vendor: VendorProfile | None = None,
    size: int = 512,
    seed: int = 0,
    k: int = 0,
) -> RenderedImage:
    """Render radiograph ``k`` of ``patient`` (pure: no files; same inputs, same pixels).

    The anatomy comes from the patient's own random stream, so all of a
    patient's images show the same body; positioning, exposure and noise come
    from the (seed, site, patient, k) stream.
    """
    if view not in ("PA", "AP", "LAT"):
        raise PhantomError(f"view must be PA, AP or LAT, got {view!r}")
    vendor = vendor or VendorProfile()
    code = site_code(patient.site)
    fov = vendor.fov_mm
    if patient.pediatric:
        from bonescreen.phantom.pediatric import field_of_view

        fov = field_of_view(vendor.fov_mm, patient.height_cm)
    an = anatomy_from_patient(
        patient.sex,
        patient.height_cm,
        patient.weight_kg,
        patient.latent,
        patient.device,
        seeded_rng(seed, code, patient.index, PATIENT_STREAM),
        child_age=patient.age if patient.pediatric else None,
    )
    rng = seeded_rng(seed, code, patient.index, k)
    acq = _acquisition(view, rng)
    A, bone_mask = render_layers(an, acq, size, fov)
    det = detect(A, vendor, rng, view=view, fov_mm=fov, bone_mask=bone_mask)
    return RenderedImage(
        stored=det.stored,
        display=det.display,
        attenuation=A,
        bone_mask=bone_mask,
        window=det.window,
        view=view,
        vendor=vendor,
        spacing_mm=fov / size,
        kvp=det.kvp,
        exposure_mas=det.exposure_mas,
        marker=det.marker,
    )


def _render_job(job: dict[str, Any]) -> dict[str, Any]:
    """Render and write one image (runs in a worker process when workers > 1)."""
    p: PatientRecord = job["patient"]
    img = render_patient_image(
        p, view=job["view"], vendor=job["vendor"], size=job["size"], seed=job["seed"], k=job["k"]
    )
    ds = dicom_dataset(
        _as_detected(img),
        job["vendor"],
        view=job["view"],
        spacing_mm=img.spacing_mm,
        patient=job["dicom_patient"],
        study=job["dicom_study"],
        institution=job["institution"],
    )
    write_dicom(job["abs_path"], ds)
    return {**job["row"], "marker": img.marker or "", "view_position": str(ds.get("ViewPosition", ""))}


def _as_detected(img: RenderedImage) -> Any:
    from bonescreen.phantom.vendors import Detected

    n = img.stored.shape[0]
    return Detected(
        stored=img.stored,
        display=img.display,
        window=img.window,
        kvp=img.kvp,
        exposure_mas=img.exposure_mas,
        field_box=(0, n, 0, n),
        marker=img.marker,
    )


# --- cohort assembly ----------------------------------------------------------------


@dataclass
class PhantomResult:
    """What ``generate_phantom`` wrote, with per-site counts and oracle AUCs."""

    out_dir: Path
    sites: dict[str, dict[str, Any]]
    oracle: dict[str, dict[str, Any]]
    n_images: int
    pool_images: int
    seconds: float
    defects: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.n_images + self.pool_images) / max(self.seconds, 1e-9)


def _build_site(spec: SiteSpec | PoolSpec, name: str, n: int, seed: int) -> dict[str, Any]:
    """Draw every patient of a site (vectorised) and plan their radiographs."""
    code = site_code(name)
    rng = seeded_rng(seed, code, 0)
    people = _draw_people(spec, n, rng)
    b0 = _calibrated_intercept(spec, name)
    latent = people["latent0"] + b0
    offset = getattr(spec, "dxa_offset", 0.0)
    noise = getattr(spec, "dxa_noise", 0.12)
    scores = _dxa_scores(latent, offset, noise, rng)
    cat = _category(scores["t_min"])
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


def _patients(name: str, built: dict[str, Any]) -> list[PatientRecord]:
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


def _prepare_out(out: Path) -> None:
    """Create ``out``; clear a previous phantom there; refuse any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        cfg = out / "phantom.json"
        if not cfg.is_file():
            raise PhantomError(f"{out} is not empty and holds no phantom.json; refusing to write into it")
        try:
            old = json.loads(cfg.read_text())
            names = [s["name"] for s in old.get("sites", [])] + ["pool"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PhantomError(f"{cfg} is unreadable ({exc}); remove the folder by hand") from exc
        for name in names:
            sub = out / name
            if sub.is_dir():
                shutil.rmtree(sub)
        for f in ("truth.csv", "truth_images.csv", "truth_pediatric.csv", "oracle.json", "phantom.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_phantom(
    out_dir: str | Path,
    *,
    sites: Sequence[SiteSpec] | None = None,
    n_per_site: int | dict[str, int] | None = None,
    pool_size: int = 200,
    pool: PoolSpec | None = None,
    size: int = 512,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> PhantomResult:
    """Write a phantom cohort to ``out_dir`` (layout: docs/ARCHITECTURE.md "Phantom layout").

    ``n_per_site``: patients per site (an int for all, a dict by site name, or
    None for each spec's ``n_patients``). Each patient gets one DXA exam and
    1-3 frontal CXRs (plus sometimes a lateral), so images > patients.
    Same arguments, same bytes: every random draw is keyed by (seed, site,
    patient, image), so ``workers`` does not change the output.
    """
    t0 = time.perf_counter()
    sites = list(sites) if sites is not None else default_sites()
    pool = pool or default_pool()
    if size < 32:
        raise PhantomError(f"size must be at least 32 pixels, got {size}")
    if pool_size < 0:
        raise PhantomError(f"pool_size must be >= 0, got {pool_size}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise PhantomError(f"duplicate site names in {names}")
    if isinstance(n_per_site, dict):
        unknown = set(n_per_site) - set(names)
        if unknown:
            raise PhantomError(f"n_per_site names unknown sites: {sorted(unknown)}")
    out = Path(out_dir)
    _prepare_out(out)

    jobs: list[dict[str, Any]] = []
    truth_rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    oracle: dict[str, dict[str, Any]] = {}
    defects: list[dict[str, str]] = []
    ped_truth: list[dict[str, Any]] = []

    for spec in sites:
        n = (
            spec.n_patients
            if n_per_site is None
            else (n_per_site.get(spec.name, spec.n_patients) if isinstance(n_per_site, dict) else int(n_per_site))
        )
        if n < 1:
            raise PhantomError(f"site {spec.name}: need at least one patient, got {n}")
        if spec.pediatric:
            from bonescreen.phantom import pediatric as ped

            s_jobs, s_truth, p_truth, s_dxa, s_oracle, effect = ped.plan_site(spec, n, out, size, seed)
            jobs += s_jobs
            truth_rows += s_truth
            ped_truth += p_truth
            (out / spec.name / "images").mkdir(parents=True, exist_ok=True)
            _write_csv(out / spec.name / "dxa.csv", ped.DXA_COLUMNS, s_dxa)
            oracle[spec.name] = s_oracle
            summaries[spec.name] = {
                "role": spec.role,
                "label_type": "z_score",
                "n_patients": n,
                "n_images": len(s_jobs),
                "n_dxa_rows": len(s_dxa),
                "burden_effect": effect,
                "vendors": [v.name for v in spec.vendors],
            }
            continue
        built = _build_site(spec, spec.name, n, seed)
        s_jobs, s_truth, s_dxa, s_defects, s_oracle = _plan_site(spec, built, out, size, seed)
        jobs += s_jobs
        truth_rows += s_truth
        defects += s_defects
        (out / spec.name / "images").mkdir(parents=True, exist_ok=True)
        _write_dxa(out / spec.name / "dxa.csv", spec, s_dxa)
        oracle[spec.name] = s_oracle
        summaries[spec.name] = {
            "role": spec.role,
            "label_type": spec.label_type,
            "n_patients": n,
            "n_images": len(s_jobs),
            "n_dxa_rows": len(s_dxa),
            "intercept": built["b0"],
            "vendors": [v.name for v in spec.vendors],
        }

    n_site_images = len(jobs)
    if pool_size > 0:
        built = _build_site(pool, "pool", pool_size, seed)
        p_jobs, p_truth = _plan_pool(pool, built, out, size, seed)
        jobs += p_jobs
        truth_rows += p_truth
        (out / "pool" / "images").mkdir(parents=True, exist_ok=True)

    image_rows = _run_jobs(jobs, workers, progress)
    _write_csv(out / "truth.csv", TRUTH_COLUMNS, truth_rows)
    _write_csv(out / "truth_images.csv", IMAGE_COLUMNS, image_rows)
    if ped_truth:
        from bonescreen.phantom import pediatric as ped

        _write_csv(out / "truth_pediatric.csv", ped.TRUTH_COLUMNS, ped_truth)
    (out / "oracle.json").write_text(json.dumps(oracle, indent=2, sort_keys=True) + "\n")
    config = {
        "generator": "bonescreen.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n_per_site": n_per_site,
        "pool_size": pool_size,
        "sites": [dataclasses.asdict(s) for s in sites],
        "pool": dataclasses.asdict(pool),
        "model": {
            "latent_sd": LATENT_SD,
            "site_offsets": SITE_OFFSETS,
            "site_sd": SITE_SD,
            "bmd_reference": BMD_REFERENCE,
            "oracle": "AUC of -latent against the measured stage-2 label (osteoporosis excluded)",
        },
        "summary": summaries,
        "defects": defects,
    }
    if ped_truth:
        from bonescreen.phantom import pediatric as ped

        config["model"]["pediatric"] = {
            "disease_frac": ped.DISEASE_FRAC,
            "spine_sd": ped.SPINE_SD,
            "rho_gain": ped.RHO_GAIN,
            "oracle": "latent = true skeletal Z: AUC of -latent for measured Z <= -2, Pearson r with measured Z",
        }
    (out / "phantom.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    seconds = time.perf_counter() - t0
    return PhantomResult(
        out_dir=out,
        sites=summaries,
        oracle=oracle,
        n_images=n_site_images,
        pool_images=len(jobs) - n_site_images,
        seconds=seconds,
        defects=defects,
    )


TRUTH_COLUMNS = [
    "patient_id",
    "site",
    "label_type",
    "sex",
    "age",
    "height_cm",
    "weight_kg",
    "bmi",
    "latent",
    *[f"t_true_{s}" for s in DXA_SITES],
    *[f"t_{s}" for s in DXA_SITES],
    "t_min",
    "category",
    "label",
    "label_stage1",
    "dxa_date",
    "has_dxa",
    "n_images",
    "device",
    "defect",
]
IMAGE_COLUMNS = [
    "image_id",
    "path",
    "patient_id",
    "site",
    "k",
    "study_date",
    "days_from_dxa",
    "view",
    "view_position",
    "vendor",
    "modality",
    "manufacturer",
    "photometric",
    "bits_stored",
    "transfer_syntax",
    "marker",
    "device",
    "study_instance_uid",
    "sop_instance_uid",
]


def _plan_site(
    spec: SiteSpec, built: dict[str, Any], out: Path, size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]], list[dict[str, str]], dict[str, Any]]:
    """Images, truth rows, DXA export rows, defects and the oracle of one site."""
    patients = _patients(spec.name, built)
    n = len(patients)
    rng: np.random.Generator = built["rng"]
    scores, cat = built["scores"], built["category"]
    start, end = iso_date(spec.date_start), iso_date(spec.date_end)
    span = max((end - start).days, 1)
    dxa_dates = [start + dt.timedelta(days=int(d)) for d in rng.integers(0, span + 1, n)]

    # messy defects, each on its own patient
    defect_of: dict[int, str] = {}
    if spec.messy and n >= len(MESSY_DEFECTS) + 2:
        chosen = rng.choice(n, size=len(MESSY_DEFECTS), replace=False)
        for kind, i in zip(MESSY_DEFECTS, chosen, strict=True):
            defect_of[int(i)] = kind
        # the reformatted date must be unambiguous (day > 12)
        i_date = next(i for i, kd in defect_of.items() if kd == "date_format")
        d = dxa_dates[i_date]
        if d.day <= 12:
            dxa_dates[i_date] = d.replace(day=13 + (d.day % 15))

    jobs: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    dxa_rows: list[dict[str, str]] = []
    defects: list[dict[str, str]] = []
    for i, p in enumerate(patients):
        prng = seeded_rng(seed, site_code(spec.name), p.index, 2 * PATIENT_STREAM)
        dxa_date = dxa_dates[i]
        birth = dxa_date - dt.timedelta(days=int(round(p.age * 365.25)))
        defect = defect_of.get(i, "")
        n_frontal = (
            0
            if defect == "dxa_without_cxr"
            else 1 + int(prng.choice(len(spec.cxr_count_probs), p=spec.cxr_count_probs))
        )
        offsets: list[int] = []
        if n_frontal:
            offsets.append(window_days(prng, spec.window_probs))
        while len(offsets) < n_frontal:
            o = int(prng.integers(30, 721)) * (1 if prng.random() < 0.5 else -1)
            if o not in offsets:
                offsets.append(o)
        k = 0
        for j, off in enumerate(offsets):
            view = "AP" if prng.random() < spec.ap_frac else "PA"
            day = dxa_date + dt.timedelta(days=off)
            jobs.append(image_job(p, k, view, pick_vendor(spec, prng), day, birth, j, 1, off, out, size, seed, prng))
            k += 1
            if j == 0 and prng.random() < spec.lateral_frac:
                jobs.append(
                    image_job(p, k, "LAT", pick_vendor(spec, prng), day, birth, j, 2, off, out, size, seed, prng)
                )
                k += 1
        has_dxa = defect != "cxr_without_dxa"
        c = str(cat[i])
        truth.append(
            _truth_row(p, spec.name, spec.label_type, scores, i, c, dxa_date.isoformat(), has_dxa, k, defect)
        )
        if has_dxa:
            dxa_rows += _dxa_rows(spec, p, i, dxa_date, scores, c, defect)
        if defect:
            defects.append({"site": spec.name, "patient_id": p.patient_id, "defect": defect})

    lab = [(r["label"], float(r["latent"])) for r in truth if r["has_dxa"] and r["label"] != ""]
    y = np.array([int(a) for a, _ in lab], dtype=int)
    lat = np.array([b for _, b in lab], dtype=float)
    with_dxa = [r for r in truth if r["has_dxa"]]
    st1 = np.array([int(r["label_stage1"]) for r in with_dxa], dtype=int)
    lat1 = np.array([float(r["latent"]) for r in with_dxa], dtype=float)
    oracle = {
        "auc": auc_or_none(y, -lat),
        "n": int(y.size),
        "prevalence": round(float(y.mean()), 4) if y.size else None,
        "n_normal": int((y == 0).sum()),
        "n_low_bone_mass": int((y == 1).sum()),
        "n_osteoporosis": int(st1.sum()),
        "auc_stage1": auc_or_none(st1, -lat1),
        "label_type": spec.label_type,
        "n_patients": n,
        "n_images": len(jobs),
    }
    return jobs, truth, dxa_rows, defects, oracle


def _dxa_rows(
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


def _dxa_columns(spec: SiteSpec) -> list[str]:
    cols = ["patient_id", "exam_date", "sex", "age"]
    if spec.label_type == "t_score":
        cols += [f"t_{s}" for s in DXA_SITES] + [f"z_{s}" for s in DXA_SITES] + [f"bmd_{s}" for s in DXA_SITES]
    return cols + ["height_cm", "weight_kg", "category", "device"]


def _write_dxa(path: Path, spec: SiteSpec, rows: list[dict[str, str]]) -> None:
    _write_csv(path, _dxa_columns(spec), rows)


def _write_csv(path: Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _plan_pool(
    spec: PoolSpec, built: dict[str, Any], out: Path, size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image per pool patient; truth keeps the hidden latent and would-be labels."""
    if not spec.vendors:
        raise PhantomError("the pool needs at least one vendor profile")
    patients = _patients("pool", built)
    scores, cat = built["scores"], built["category"]
    jobs, truth = [], []
    start = dt.date(2008, 1, 1)
    for i, p in enumerate(patients):
        prng = seeded_rng(seed, site_code("pool"), p.index, 2 * PATIENT_STREAM)
        day = start + dt.timedelta(days=int(prng.integers(0, 365 * 12)))
        birth = day - dt.timedelta(days=int(round(p.age * 365.25)))
        u = prng.random()
        view = "LAT" if u < spec.lateral_frac else ("AP" if u < spec.lateral_frac + spec.ap_frac else "PA")
        jobs.append(image_job(p, 0, view, pick_vendor(spec, prng), day, birth, 0, 1, None, out, size, seed, prng))
        truth.append(_truth_row(p, "pool", "hidden", scores, i, str(cat[i]), "", False, 1, ""))
    return jobs, truth


def _truth_row(
    p: Any, site: str, label_type: str, scores: dict[str, Any], i: int, c: str,
    dxa_date: str, has_dxa: bool, n_images: int, defect: str,
) -> dict[str, Any]:
    """One row of truth.csv: demographics, the latent, true and measured T-scores, labels."""
    return {
        "patient_id": p.patient_id,
        "site": site,
        "label_type": label_type,
        "sex": p.sex,
        "age": fmt_number(p.age, 2),
        "height_cm": fmt_number(p.height_cm),
        "weight_kg": fmt_number(p.weight_kg),
        "bmi": fmt_number(p.weight_kg / (p.height_cm / 100) ** 2, 2),
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


def _run_jobs(jobs: list[dict[str, Any]], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress)
    rows: list[dict[str, Any]] = []
    try:
        if workers <= 1:
            for job in jobs:
                rows.append(_render_job(job))
                bar.update(1)
        else:
            # spawn: safe with threads/BLAS in the parent; results come back in job order
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
                for row in ex.map(_render_job, jobs, chunksize=8):
                    rows.append(row)
                    bar.update(1)
    finally:
        bar.close()
    return rows
