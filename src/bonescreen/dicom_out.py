"""DICOM outputs with highdicom: a TID 1500 Comprehensive 3D SR per screened **study**,
and a secondary-capture image of the Grad-CAM overlay per image.

The SR summarises the study (the finding of the image that decides it,
``screen.decide.rollup_study``) and references every image it used: one
measurement group per image (its scores, its finding, the image as source),
plus, when the study has several images, a study group whose finding is the
study's and whose source images are all of them. Every image is listed in the
evidence (Current Requested Procedure Evidence Sequence). Only the first
image's header is needed (patient and study are copied from it); the others
are referenced by their UIDs (:class:`ImageReference`), so the service can
build the study's SR after earlier images have left its spool.

Both objects inherit patient and study from the source image (highdicom copies
the Patient and General Study modules from the evidence / reference dataset),
get new Series and SOP Instance UIDs, and reference their images. UIDs are
derived (``generate_uid(entropy_srcs=...)``) from the study (SR) or the image
(SC), the model id and, for the SR, the set of images it reports: screening the
same study again gives the same UIDs (a PACS replaces rather than duplicates),
a study that gained an image gets a new SR (a new document version), and
another model gives other UIDs.

Codes: the score is a numeric measurement with a private (``99BONESCR``)
concept, since no standard code exists for "probability of low bone mass
from a radiograph", in UCUM unit ``1``; the category is a qualitative
evaluation "Finding" (DCM 121071) valued with SNOMED CT 17621005 Normal,
312894000 Osteopenia (low bone mass) or 64859006 Osteoporosis, or, inside a
site profile's abstain band, 82334004 Indeterminate ("consider DXA"); the
site profile's name and band are algorithm parameters, and its site-calibrated
probability a measurement.

Pediatric results carry the predicted lumbar-spine BMD Z-score (UCUM
``{Z-score}``), the predicted BMD (``g/cm2``) and P(Z <= -2.0) (``1``) as
numeric measurements (private concepts: these are model predictions, not DXA
measurements), and the finding "Low BMD for chronological age" (private
code; a child's low Z-score is not called osteopenia) or SNOMED CT Normal.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from bonescreen import __version__
from bonescreen.errors import BonescreenError
from bonescreen.fsio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = [
    "CATEGORY_CODES",
    "ImageReference",
    "PEDIATRIC_MEASUREMENTS",
    "SCORE_CONCEPTS",
    "SCORE_UNITS",
    "DicomOutputError",
    "ScreeningResult",
    "build_sc",
    "build_sr",
    "build_study_sr",
    "ood_review",
    "read_source",
    "write_sc",
    "write_sr",
    "write_study_sr",
]

# highdicom logs every module it copies at INFO; one line per image is noise in a screening run.
if logging.getLogger("highdicom").level == logging.NOTSET:
    logging.getLogger("highdicom").setLevel(logging.WARNING)

MANUFACTURER = "bonescreen"
PRIVATE_SCHEME = "99BONESCR"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
DISCLAIMER = "Research software output; not a diagnosis. Confirm with DXA."

# SNOMED CT: 17621005 Normal, 312894000 Osteopenia, 64859006 Osteoporosis.
CATEGORY_CODES: dict[str, tuple[str, str, str]] = {
    "normal": ("17621005", "SCT", "Normal"),
    "low_bone_mass": ("312894000", "SCT", "Osteopenia"),
    "osteoporosis": ("64859006", "SCT", "Osteoporosis"),
    "not_osteoporosis": ("not-osteoporosis", PRIVATE_SCHEME, "No osteoporosis detected"),
    # pediatric (predicted Z-score <= -2.0 or not)
    "low_bmd": ("low-bmd-for-age", PRIVATE_SCHEME, "Low BMD for chronological age"),
    "normal_bmd": ("17621005", "SCT", "Normal"),
    # the abstain band of a site profile: no class near the cut-off, "consider DXA"
    "indeterminate": ("82334004", "SCT", "Indeterminate"),
}
SCORE_CONCEPTS: dict[str, tuple[str, str, str]] = {
    "score_stage2": ("p-low-bone-mass", PRIVATE_SCHEME, "Probability of low bone mass"),
    "score_stage1": ("p-osteoporosis", PRIVATE_SCHEME, "Probability of osteoporosis"),
    "p_normal": ("p3-normal", PRIVATE_SCHEME, "Three-class probability of normal bone mass"),
    "p_low_bone_mass": ("p3-low-bone-mass", PRIVATE_SCHEME, "Three-class probability of low bone mass"),
    "p_osteoporosis": ("p3-osteoporosis", PRIVATE_SCHEME, "Three-class probability of osteoporosis"),
    # under a site profile: the score recalibrated at that site (bonescreen.adapt)
    "site_probability": ("p-site-calibrated", PRIVATE_SCHEME, "Site-calibrated probability"),
    # pediatric
    "prob_low_bmd": ("p-low-bmd", PRIVATE_SCHEME, "Probability of BMD Z-score <= -2.0"),
    "pred_z": ("pred-z-lumbar-spine", PRIVATE_SCHEME, "Predicted lumbar spine BMD Z-score"),
    "pred_bmd": ("pred-bmd-lumbar-spine", PRIVATE_SCHEME, "Predicted lumbar spine BMD"),
}
#: Units other than UCUM ``1`` (no units): (code value, scheme, meaning).
SCORE_UNITS: dict[str, tuple[str, str, str]] = {
    "pred_z": ("{Z-score}", "UCUM", "Z-score"),
    "pred_bmd": ("g/cm2", "UCUM", "gram per square centimeter"),
}
#: Row columns of a pediatric result reported as measurements (``score`` is P(Z <= -2.0)).
PEDIATRIC_MEASUREMENTS = {"prob_low_bmd": "score", "pred_z": "pred_z", "pred_bmd": "pred_bmd"}
TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
# SNOMED CT 399208008 "Plain chest X-ray"
PROCEDURE = ("399208008", "SCT", "Plain chest X-ray")


class DicomOutputError(BonescreenError):
    reason = "dicom_output_failed"


@dataclass
class ScreeningResult:
    """What an SR reports about one image."""

    category: str
    scores: dict[str, float]  # keys of SCORE_CONCEPTS present for this image
    model_id: str
    task: str
    thresholds: dict[str, float]
    model_stage1_id: str = ""
    arch: str = ""
    ood_review: bool = False  # the OOD check flagged the image for review (schema.OOD_FLAG_REASONS)
    site_profile: str = ""  # the site profile it was decided under (bonescreen.adapt); "" none
    abstain_band: tuple[float, float] | None = None  # [low, high) on the score; inside: indeterminate


def ood_review(row: dict[str, Any]) -> bool:
    """The row is scored but the OOD check flagged it for review (--ood flag, or the flag band)."""
    from bonescreen.schema import OOD_FLAG_REASONS

    return str(row.get("reason") or "") in OOD_FLAG_REASONS


def read_source(path: str | os.PathLike[str]) -> Dataset:
    """The source header (no pixels) with the attributes SR/SC need checked."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DicomOutputError(f"{Path(path).name}: cannot read the source header ({exc})") from exc
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
               if not ds.get(k)]
    if missing:
        raise DicomOutputError(f"{Path(path).name}: source lacks {', '.join(missing)}; cannot reference it")
    # Type 2 patient/study attributes must exist (possibly empty) in what highdicom copies;
    # radiographs in the wild often omit them.
    for kw in TYPE2_COPIED:
        if kw not in ds:
            setattr(ds, kw, "")
    return ds


def _code(t: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=t[0], scheme_designator=t[1], meaning=t[2])


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[MANUFACTURER, *parts]))


@dataclass(frozen=True)
class ImageReference:
    """The UIDs an SR needs to reference an image it does not have the header of."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    @classmethod
    def from_dataset(cls, ds: Any) -> ImageReference:
        return cls(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                   str(ds.StudyInstanceUID))

    def dataset(self) -> Dataset:
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        return ds


def _algorithm(result: ScreeningResult) -> Any:
    import highdicom as hd

    params = [f"{k} threshold={v:g}" for k, v in sorted(result.thresholds.items())]
    if result.model_stage1_id:
        params.append(f"stage1 model={result.model_stage1_id}")
    if result.site_profile:
        params.append(f"site profile={result.site_profile}")
    if result.abstain_band is not None:
        params.append(f"abstain band=[{result.abstain_band[0]:.4g}, {result.abstain_band[1]:.4g})")
    return hd.sr.AlgorithmIdentification(
        name=f"bonescreen {result.task}", version=f"{__version__} model {result.model_id}"[:64],
        parameters=params or None, manufacturer=MANUFACTURER,
    )


def _finding(category: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if category not in CATEGORY_CODES:
        raise DicomOutputError(f"unknown category {category!r}")
    return hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=_code(CATEGORY_CODES[category]))


def _image_group(ref: ImageReference, result: ScreeningResult, label: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = _algorithm(result)
    if result.ood_review:  # scored, but the OOD check asks a reader to look (--ood flag, or the flag band)
        label = f"{label} [OOD review]"
    src = hd.sr.SourceImageForMeasurement(ref.sop_class_uid, ref.sop_instance_uid)
    measurements = [
        hd.sr.Measurement(
            name=_code(SCORE_CONCEPTS[key]), value=float(value),
            unit=_code(SCORE_UNITS[key]) if key in SCORE_UNITS else codes.UCUM.NoUnits,
            algorithm_id=algo, referenced_images=[src],
        )
        for key, value in result.scores.items()
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid("tracking", ref.sop_instance_uid, result.model_id), identifier=label[:64]
        ),
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=[_finding(result.category)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ref.sop_class_uid, ref.sop_instance_uid)],
    )


def build_study_sr(
    source: Dataset,
    study: ScreeningResult,
    images: list[tuple[ImageReference, ScreeningResult]],
    *,
    decided_by: str | None = None,
) -> Any:
    """One TID 1500 Measurement Report for a study: a group per image, and a study group when several.

    ``source`` is the header of one image of the study (patient and study are copied
    from it); ``images`` are every image the study's result used, with their own
    results; ``study`` is the study's result (``decided_by``: the SOP Instance UID of
    the image it comes from).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not images:
        raise DicomOutputError("a study SR needs at least one image")
    study_uid = str(source.StudyInstanceUID)
    if any(ref.study_instance_uid != study_uid for ref, _ in images):
        raise DicomOutputError("every image of a study SR must belong to the source's study")
    groups = [
        _image_group(ref, res, "bone health screening" + (" (decides the study)"
                                                          if len(images) > 1 and ref.sop_instance_uid == decided_by
                                                          else ""))
        for ref, res in images
    ]
    if len(images) > 1:
        groups.insert(0, hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid("tracking-study", study_uid, study.model_id),
                identifier=f"bone health screening: study of {len(images)} images",
            ),
            algorithm_id=_algorithm(study),
            qualitative_evaluations=[_finding(study.category)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(ref.sop_class_uid, ref.sop_instance_uid)
                           for ref, _ in images],
        ))
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", study.model_id), name="bonescreen", manufacturer_name=MANUFACTURER,
            model_name=(study.arch or study.task)[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code(PROCEDURE),
        imaging_measurements=groups,
    )
    sops = sorted(ref.sop_instance_uid for ref, _ in images)
    evidence = [source] + [ref.dataset() for ref, _ in images if ref.sop_instance_uid != str(source.SOPInstanceUID)]
    now = dt.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=_uid("sr-series", study_uid, study.model_id),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid("sr", study_uid, study.model_id, *sops),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="bonescreen bone health screening",
    )
    # highdicom annotates these as pydicom's DA/TM; pydicom takes the DICOM string form and converts it
    sr.ContentDate = now.strftime("%Y%m%d")  # type: ignore[assignment]
    sr.ContentTime = now.strftime("%H%M%S")  # type: ignore[assignment]
    sr.SoftwareVersions = __version__
    return sr


def build_sr(source: Dataset, result: ScreeningResult) -> Any:
    """The SR of a study of one image (``source``)."""
    return build_study_sr(source, result, [(ImageReference.from_dataset(source), result)],
                          decided_by=str(source.SOPInstanceUID))


def build_sc(source: Dataset, rgb: np.ndarray, *, model_id: str = "") -> Any:
    """Secondary capture (RGB) of a Grad-CAM overlay, in the source's patient and study."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DicomOutputError(f"overlay must be RGB (H, W, 3); got {arr.shape}")
    sop = str(source.SOPInstanceUID)
    orientation = source.get("PatientOrientation")
    if not orientation or len(orientation) != 2:
        orientation = ("L", "F")  # a frontal CXR displayed as usual: rows to the left, columns down
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=arr,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_uid("sc-series", sop, model_id),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=_uid("sc", sop, model_id),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=cast("tuple[str, str]", tuple(str(o) for o in orientation)),  # two values (checked above)
        series_description="bonescreen Grad-CAM overlay",
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = f"Grad-CAM overlay, bonescreen {__version__}, model {model_id}"[:1024]
    sc.ImageComments = DISCLAIMER
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([ref])
    return sc


def _atomic_save(ds: Any, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return dest


def write_sr(source_path: str | os.PathLike[str], result: ScreeningResult, dest: str | os.PathLike[str]) -> Path:
    return _atomic_save(build_sr(read_source(source_path), result), Path(dest))


def write_sc(source_path: str | os.PathLike[str], rgb: np.ndarray, dest: str | os.PathLike[str], *,
             model_id: str = "") -> Path:
    return _atomic_save(build_sc(read_source(source_path), rgb, model_id=model_id), Path(dest))


def write_study_sr(source_path: str | os.PathLike[str], study: ScreeningResult,
                   images: list[tuple[ImageReference, ScreeningResult]], dest: str | os.PathLike[str], *,
                   decided_by: str | None = None) -> Path:
    return _atomic_save(build_study_sr(read_source(source_path), study, images, decided_by=decided_by), Path(dest))
