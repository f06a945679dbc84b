"""One radiograph of a phantom patient: anatomy -> exposure -> detector -> DICOM file.

Pure and keyed: the body comes from the patient's own random stream, the
positioning, exposure and noise from the (seed, site, patient, image) stream,
so any worker renders the same pixels for the same job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bonescreen.phantom.anatomy import Acquisition, anatomy_from_patient, render_layers
from bonescreen.phantom.common import PATIENT_STREAM, PatientRecord, PhantomError, seeded_rng, site_code
from bonescreen.phantom.pediatric import field_of_view
from bonescreen.phantom.vendors import Detected, VendorProfile, detect, dicom_dataset, write_dicom

__all__ = ["RenderedImage", "acquisition", "render_patient_image", "render_job", "as_detected"]


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


def acquisition(view: str, rng: np.random.Generator) -> Acquisition:
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
    acq = acquisition(view, rng)
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


def render_job(job: dict[str, Any]) -> dict[str, Any]:
    """Render and write one image (runs in a worker process when workers > 1)."""
    p: PatientRecord = job["patient"]
    img = render_patient_image(
        p, view=job["view"], vendor=job["vendor"], size=job["size"], seed=job["seed"], k=job["k"]
    )
    ds = dicom_dataset(
        as_detected(img),
        job["vendor"],
        view=job["view"],
        spacing_mm=img.spacing_mm,
        patient=job["dicom_patient"],
        study=job["dicom_study"],
        institution=job["institution"],
    )
    write_dicom(job["abs_path"], ds)
    return {**job["row"], "marker": img.marker or "", "view_position": str(ds.get("ViewPosition", ""))}


def as_detected(img: RenderedImage) -> Detected:
    """The detector output a rendered image came from (what ``dicom_dataset`` encodes)."""
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
