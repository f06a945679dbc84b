"""What every phantom planner shares: site specs, patient records, seeded draws, the
per-image job a worker renders and the :class:`SitePlan` each planner returns.

The planners (``phantom.adult``, ``phantom.pediatric``) turn a :class:`SiteSpec`
into a :class:`SitePlan`; ``phantom.generate`` renders and writes any plan the
same way, so nothing here knows which population a site holds.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.errors import BonescreenError
from bonescreen.phantom.vendors import VendorProfile

__all__ = [
    "DXA_SITES",
    "TRUTH_COLUMNS",
    "IMAGE_COLUMNS",
    "PATIENT_STREAM",
    "Table",
    "SitePlan",
    "patient_rng",
    "dxa_dates",
    "cxr_count",
    "plan_radiographs",
    "site_summary",
    "PhantomError",
    "SiteSpec",
    "PoolSpec",
    "site_code",
    "seeded_rng",
    "truncnorm",
    "PatientRecord",
    "dicom_uid",
    "iso_date",
    "age_on",
    "window_days",
    "fmt_number",
    "auc_or_none",
    "dicom_patient",
    "demographics",
    "image_job",
    "pick_vendor",
]


DXA_SITES = ("lumbar_spine", "femoral_neck", "total_hip")
PATIENT_STREAM = 1_000_000  # generator stream id for patient-level (anatomy) draws
# truth.csv: one row per patient of every site and the pool (pediatric sites fill what they have)
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
# truth_images.csv: one row per radiograph
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


class PhantomError(BonescreenError):
    """The phantom cannot be generated as asked (bad spec, occupied output folder)."""

    reason = "phantom"


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: population, DXA practice, radiography systems and label type."""

    name: str
    n_patients: int = 200
    role: str = "external"  # "development" | "external"
    label_type: str = "t_score"  # "t_score" | "category" (institutional category only)
    age_mean: float = 58.0
    age_sd: float = 8.0
    age_min: float = 45.0
    age_max: float = 90.0
    female_frac: float = 0.55
    prevalence: float = 0.40  # target stage-2 prevalence: low bone mass / (normal + low bone mass)
    vendors: tuple[VendorProfile, ...] = (VendorProfile(),)
    vendor_weights: tuple[float, ...] | None = None
    ap_frac: float = 0.05  # frontal views taken AP (portable)
    lateral_frac: float = 0.15  # patients with an extra lateral view
    device_frac: float = 0.02  # pacemaker-like implant
    cxr_count_probs: tuple[float, ...] = (0.5, 0.3, 0.2)  # P(1, 2, 3 frontal CXRs)
    # nearest CXR to the DXA: same day, 1-90 days, 91-180 days, 181-400 days
    window_probs: tuple[float, float, float, float] = (0.5, 0.3, 0.12, 0.08)
    date_start: str = "2012-01-01"
    date_end: str = "2019-12-31"
    dxa_device: str = "GE Lunar Prodigy"
    dxa_offset: float = 0.0  # device calibration shift (T-score units)
    dxa_noise: float = 0.12  # precision error (T-score units)
    messy: bool = False  # add realistic DXA-table defects
    pediatric: bool = False  # ages 0-17, growth, Z-scores (bonescreen.phantom.pediatric)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\. "):
            raise PhantomError(f"site name {self.name!r} must be a plain folder name")
        if self.name.lower() == "pool":
            raise PhantomError("site name 'pool' is reserved for the unlabelled pool")
        if self.label_type not in ("t_score", "category"):
            raise PhantomError(f"label_type must be 't_score' or 'category', got {self.label_type!r}")
        if not 0.05 <= self.prevalence <= 0.95:
            raise PhantomError(f"prevalence must be in [0.05, 0.95], got {self.prevalence}")
        if self.age_min >= self.age_max:
            raise PhantomError(f"age_min {self.age_min} must be below age_max {self.age_max}")
        if self.pediatric and (self.age_min < 0 or self.age_max >= 18.0):
            raise PhantomError(
                f"pediatric site {self.name}: ages must lie in [0, 18), got {self.age_min}..{self.age_max}"
            )
        if not self.vendors:
            raise PhantomError(f"site {self.name} needs at least one vendor profile")
        if self.vendor_weights is not None and len(self.vendor_weights) != len(self.vendors):
            raise PhantomError(f"site {self.name}: one vendor weight per vendor profile")
        if abs(sum(self.window_probs) - 1.0) > 1e-6 or abs(sum(self.cxr_count_probs) - 1.0) > 1e-6:
            raise PhantomError(f"site {self.name}: window_probs and cxr_count_probs must each sum to 1")


@dataclass(frozen=True)
class PoolSpec:
    """The unlabelled pool (stands in for NIH ChestX-ray14 / CheXpert "No Finding")."""

    age_mean: float = 60.0
    age_sd: float = 14.0
    age_min: float = 25.0
    age_max: float = 95.0
    female_frac: float = 0.45
    prevalence: float = 0.40
    ap_frac: float = 0.25
    lateral_frac: float = 0.05
    device_frac: float = 0.0  # "No Finding": no implants
    vendors: tuple[VendorProfile, ...] = ()
    vendor_weights: tuple[float, ...] | None = None


def site_code(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def truncnorm(rng: np.random.Generator, n: int, mean: float, sd: float, lo: float, hi: float) -> np.ndarray:
    out = rng.normal(mean, sd, n)
    bad = (out < lo) | (out > hi)
    while bad.any():
        out[bad] = rng.normal(mean, sd, int(bad.sum()))
        bad = (out < lo) | (out > hi)
    return out


@dataclass(frozen=True)
class PatientRecord:
    """What the renderer needs to know about a patient (the truth, not the export)."""

    patient_id: str
    site: str
    index: int
    sex: str
    age: float
    height_cm: float
    weight_kg: float
    latent: float
    device: bool = False
    # pediatric: ``latent`` is the image density (absolute mineral, see
    # phantom.pediatric.image_density); the body is a child's, collimated to size
    pediatric: bool = False


def dicom_uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def iso_date(s: str) -> dt.date:
    return dt.date.fromisoformat(s)


def age_on(birth: dt.date, day: dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def window_days(rng: np.random.Generator, probs: Sequence[float]) -> int:
    cls = int(rng.choice(4, p=np.asarray(probs, dtype=float)))
    if cls == 0:
        return 0
    lo, hi = [(1, 90), (91, 180), (181, 400)][cls - 1]
    return int(rng.integers(lo, hi + 1)) * (1 if rng.random() < 0.5 else -1)


def fmt_number(v: float, nd: int = 1) -> str:
    r = round(float(v), nd)
    return f"{(0.0 if r == 0 else r):.{nd}f}"  # never "-0.0"


def auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(labels, scores)), 4)


def demographics(p: PatientRecord) -> dict[str, str]:
    """The truth tables' patient columns: id, site, sex, age, height, weight, BMI (as written)."""
    return {
        "patient_id": p.patient_id,
        "site": p.site,
        "sex": p.sex,
        "age": fmt_number(p.age, 2),
        "height_cm": fmt_number(p.height_cm),
        "weight_kg": fmt_number(p.weight_kg),
        "bmi": fmt_number(p.weight_kg / (p.height_cm / 100) ** 2, 2),
    }


def dicom_patient(p: PatientRecord, birth: dt.date, study: dt.date) -> dict[str, str]:
    return {
        "PatientID": p.patient_id,
        "PatientName": f"PHANTOM^{p.patient_id.replace('-', '')}",
        "PatientSex": p.sex,
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientAge": f"{max(age_on(birth, study), 0):03d}Y",
    }


def image_job(
    p: PatientRecord,
    k: int,
    view: str,
    vendor: VendorProfile,
    study_date: dt.date,
    birth: dt.date,
    study_key: int,
    series_no: int,
    days: int | None,
    out: Path,
    size: int,
    seed: int,
    time_rng: np.random.Generator,
) -> dict[str, Any]:
    image_id = f"{p.patient_id}_{k:02d}"
    rel = f"{p.site}/images/{image_id}.dcm"
    study_uid = dicom_uid(seed, p.site, p.patient_id, "study", study_key)
    series_uid = dicom_uid(seed, p.site, p.patient_id, "series", k)
    sop_uid = dicom_uid(seed, p.site, p.patient_id, "image", k)
    hh, mm, ss = int(time_rng.integers(7, 19)), int(time_rng.integers(0, 60)), int(time_rng.integers(0, 60))
    acc = f"PH{site_code(p.site) % 1000:03d}{p.index:05d}{study_key:02d}"
    return {
        "patient": p,
        "k": k,
        "view": view,
        "vendor": vendor,
        "size": size,
        "seed": seed,
        "institution": "PHANTOM " + p.site,
        "abs_path": str(out / rel),
        "dicom_patient": dicom_patient(p, birth, study_date),
        "dicom_study": {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": sop_uid,
            "StudyDate": study_date.strftime("%Y%m%d"),
            "StudyTime": f"{hh:02d}{mm:02d}{ss:02d}",
            "AccessionNumber": acc,
            "SeriesNumber": str(series_no),
            "InstanceNumber": "1",
        },
        "row": {
            "image_id": image_id,
            "path": rel,
            "patient_id": p.patient_id,
            "site": p.site,
            "k": k,
            "study_date": study_date.isoformat(),
            "days_from_dxa": "" if days is None else days,
            "view": view,
            "vendor": vendor.name,
            "modality": vendor.modality,
            "manufacturer": vendor.manufacturer,
            "photometric": vendor.photometric,
            "bits_stored": vendor.bits_stored,
            "transfer_syntax": vendor.transfer_syntax,
            "device": int(p.device),
            "study_instance_uid": study_uid,
            "sop_instance_uid": sop_uid,
        },
    }


def pick_vendor(spec: SiteSpec | PoolSpec, rng: np.random.Generator) -> VendorProfile:
    if len(spec.vendors) == 1:
        return spec.vendors[0]
    w = np.asarray(spec.vendor_weights or [1.0] * len(spec.vendors), dtype=float)
    return spec.vendors[int(rng.choice(len(spec.vendors), p=w / w.sum()))]


@dataclass(frozen=True)
class Table:
    """A CSV table a plan contributes: file name, column order, rows."""

    name: str
    columns: Sequence[str]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class SitePlan:
    """Everything one site (or the pool) adds to a phantom, before any pixel is rendered.

    Every planner returns this type, so one writer renders the ``jobs`` and
    writes the truth tables, ``oracle.json`` and ``phantom.json`` for adult,
    pediatric and pool plans alike.
    """

    name: str  # site folder ("pool" for the unlabelled pool)
    population: str  # "adult" | "pediatric" | "pool": the planner that made it
    spec: SiteSpec | PoolSpec  # what was planned
    patients: list[PatientRecord]  # what the renderer knows of each patient, in order
    jobs: list[dict[str, Any]]  # one per radiograph (``image_job``), in render order
    truth: list[dict[str, Any]]  # rows of truth.csv (TRUTH_COLUMNS)
    dxa: Table | None = None  # the site's DXA export (``<site>/dxa.csv``); None for the pool
    oracle: dict[str, Any] | None = None  # oracle.json entry; None for the pool
    summary: dict[str, Any] | None = None  # phantom.json "summary" entry; None for the pool
    defects: list[dict[str, str]] = field(default_factory=list)  # messy-export defects
    extra_truth: Table | None = None  # a population's own truth table (truth_pediatric.csv)


def patient_rng(seed: int, site: str, index: int) -> np.random.Generator:
    """The stream a planner draws one patient's radiographs (count, dates, views, vendors) from."""
    return seeded_rng(seed, site_code(site), index, 2 * PATIENT_STREAM)


def dxa_dates(spec: SiteSpec, rng: np.random.Generator, n: int) -> list[dt.date]:
    """One DXA exam date per patient, uniform over the site's date range."""
    start, end = iso_date(spec.date_start), iso_date(spec.date_end)
    span = max((end - start).days, 1)
    return [start + dt.timedelta(days=int(d)) for d in rng.integers(0, span + 1, n)]


def cxr_count(spec: SiteSpec, prng: np.random.Generator) -> int:
    """How many frontal radiographs a patient has (1-3, ``spec.cxr_count_probs``)."""
    return 1 + int(prng.choice(len(spec.cxr_count_probs), p=spec.cxr_count_probs))


def plan_radiographs(
    p: PatientRecord,
    spec: SiteSpec,
    prng: np.random.Generator,
    dxa_date: dt.date,
    birth: dt.date,
    n_frontal: int,
    out: Path,
    size: int,
    seed: int,
    *,
    skip_before_birth: bool = False,
) -> list[dict[str, Any]]:
    """The image jobs of one patient: ``n_frontal`` frontal CXRs around the DXA, maybe a lateral.

    The nearest one falls in the pairing window (``spec.window_probs``), the
    others 30-720 days away; the first study may add a lateral view.
    ``skip_before_birth`` drops a study dated before the child was born.
    """
    offsets: list[int] = []
    if n_frontal:
        offsets.append(window_days(prng, spec.window_probs))
    while len(offsets) < n_frontal:
        o = int(prng.integers(30, 721)) * (1 if prng.random() < 0.5 else -1)
        if o not in offsets:
            offsets.append(o)
    jobs: list[dict[str, Any]] = []
    for j, off in enumerate(offsets):
        view = "AP" if prng.random() < spec.ap_frac else "PA"
        day = dxa_date + dt.timedelta(days=off)
        if skip_before_birth and day < birth:
            continue
        k = len(jobs)
        jobs.append(image_job(p, k, view, pick_vendor(spec, prng), day, birth, j, 1, off, out, size, seed, prng))
        if j == 0 and prng.random() < spec.lateral_frac:
            jobs.append(
                image_job(p, k + 1, "LAT", pick_vendor(spec, prng), day, birth, j, 2, off, out, size, seed, prng)
            )
    return jobs


def site_summary(
    spec: SiteSpec, label_type: str, n: int, n_images: int, n_dxa_rows: int, **extra: Any
) -> dict[str, Any]:
    """The phantom.json "summary" entry of one site (``extra``: the planner's own facts)."""
    return {
        "role": spec.role,
        "label_type": label_type,
        "n_patients": n,
        "n_images": n_images,
        "n_dxa_rows": n_dxa_rows,
        **extra,
        "vendors": [v.name for v in spec.vendors],
    }
