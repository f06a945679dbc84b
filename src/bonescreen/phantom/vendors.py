"""Detector and vendor look: attenuation image -> stored DICOM pixels -> file.

A :class:`VendorProfile` describes one radiography system: how the detector
responds (log or linear), exposure and noise, scatter and blur, processing
(auto-ranging, edge enhancement), collimation, burned-in markers and how the
DICOM object is encoded (CR or DX, bit depth, MONOCHROME1/2, rescale, VOI
window, compression). Every per-image random choice comes from the image's
own generator, and none of it looks at the patient's bone density.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
TRANSFER_SYNTAXES = ("explicit", "rle", "j2k")


@dataclass(frozen=True)
class VendorProfile:
    """One imaging system's look and DICOM encoding (defaults: a generic DR unit)."""

    name: str = "generic_dr"
    manufacturer: str = "Phantom Imaging"
    model: str = "PX-DR 1"
    modality: str = "DX"  # "DX" (Digital X-Ray For Presentation) or "CR"
    bits_stored: int = 12  # 10..16, always in 16 allocated bits
    photometric: str = "MONOCHROME2"
    pixel_representation: int = 0  # 1 = signed two's complement
    response: str = "log"  # "log" (value ~ attenuation) or "linear" (value ~ dose, inverted)
    linear_k: float = 0.6  # curvature of the linear response
    exposure: float = 1.0  # relative photon fluence (quantum noise ~ 1/sqrt)
    electronic_noise: float = 0.002  # additive noise, fraction of the display range
    scatter: float = 0.05  # scatter relative to the local mean primary fluence
    blur_mm: float = 0.35  # detector / focal-spot blur (Gaussian sigma)
    detail_gain: float = 1.6  # multi-scale processing: gain on detail finer than ~12 mm
    range_compression: float = 0.7  # ... and on the coarse (lung vs mediastinum) range
    fov_mm: float = 430.0  # field of view imaged onto the matrix
    range_jitter: float = 0.015  # per-image auto-ranging jitter (fraction of range)
    display_range: tuple[float, float] = (0.05, 0.65)  # of full scale: air/lung .. abdominal soft tissue
    range_percentiles: tuple[float, float] = (1.0, 75.0)  # auto-ranging anchors in the exposed field
    collimation: float = 0.05  # typical collimation margin (fraction of the side), varies per image
    collimation_fill: str = "white"  # "white" (unexposed) or "black" (masked)
    marker: str | None = "R"  # burned-in letter ("R", "L", "both") or None
    marker_prob: float = 0.85
    # burned-in text line (institution / device / exposure index), as CR readers and
    # some DR consoles print into the pixels; None = no text
    annotation: str | None = None
    voi_window: bool = False  # write WindowCenter / WindowWidth
    rescale: tuple[float, float] | None = None  # (slope, intercept) written when given
    transfer_syntax: str = "explicit"  # "explicit" | "rle" | "j2k"
    lateral_label: str = "LL"  # ViewPosition written for lateral views
    view_in_description_only: bool = False  # leave ViewPosition empty; say it in SeriesDescription

    def __post_init__(self) -> None:
        if not 10 <= self.bits_stored <= 16:
            raise ValueError(f"bits_stored must be 10..16, got {self.bits_stored}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {self.photometric!r}")
        if self.modality not in ("CR", "DX"):
            raise ValueError(f"modality must be CR or DX, got {self.modality!r}")
        if self.response not in ("log", "linear"):
            raise ValueError(f"response must be 'log' or 'linear', got {self.response!r}")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax must be one of {TRANSFER_SYNTAXES}, got {self.transfer_syntax!r}")
        if self.transfer_syntax == "j2k" and self.pixel_representation:
            raise ValueError("j2k encoding is only used for unsigned pixel data here")


@dataclass
class Detected:
    """Pixels as stored in the DICOM plus what the header needs to describe them."""

    stored: np.ndarray  # uint16 or int16, (size, size)
    display: np.ndarray  # float32, bone bright, ~[0, 1] over the tissue range
    window: tuple[float, float] | None  # (center, width) in modality-LUT output units
    kvp: float
    exposure_mas: float
    field_box: tuple[int, int, int, int]  # collimated field (r0, r1, c0, c1)
    marker: str | None
    extra: dict[str, Any] = field(default_factory=dict)


# 5x7 bitmaps of the lead-marker letters (burned into the pixels).
_GLYPHS = {
    "L": ["1....", "1....", "1....", "1....", "1....", "1....", "11111"],
    "R": ["1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"],
}


def _glyph(letter: str, height_px: int) -> np.ndarray:
    g = np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=bool)
    h = max(height_px, 5)
    w = max(int(round(h * 5 / 7)), 4)
    ri = np.minimum((np.arange(h) * 7) // h, 6)
    ci = np.minimum((np.arange(w) * 5) // w, 4)
    return g[ri][:, ci]


def _burn_text(val: np.ndarray, text: str, rng: np.random.Generator, spacing: float,
               box: tuple[int, int, int, int]) -> None:
    """Burn ``text`` plus a per-image exposure index, white, into the lower left of the field.

    Letters are ~7 mm tall (OpenCV's Hershey font, deterministic); the line is
    clipped to the image and never reaches the central region that sets the
    grayscale truncation on a typical field.
    """
    import cv2

    n = val.shape[0]
    r0, r1, c0, c1 = box
    line = f"{text} EI {int(rng.integers(200, 2400))}"
    height_px = max(5.0, 7.0 / spacing)
    scale = height_px / 22.0  # FONT_HERSHEY_SIMPLEX capitals are ~22 px tall at scale 1
    thick = max(1, int(round(height_px / 8)))
    x = min(max(c0 + max(2, n // 40), 0), n - 1)
    y = min(max(r1 - max(3, n // 30), int(height_px) + 1), n - 1)
    ink = np.zeros(val.shape, dtype=np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(ink, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_8)
    val[ink > 0] = 1.0


def _lowpass(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Wide Gaussian blur via a subsampled grid (scatter / unsharp masking are smooth)."""
    n = img.shape[0]
    f = max(1, int(sigma_px // 3))
    small = img[f // 2 :: f, f // 2 :: f]
    small = ndimage.gaussian_filter(small, sigma_px / f, mode="nearest")
    m = small.shape[0]
    # separable linear upsampling by gathers (no BLAS: its thread start-up
    # costs more than the work on these small arrays)
    pos = np.clip((np.arange(n) - f // 2) / f, 0, m - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, m - 1)
    t = (pos - i0).astype(np.float32)
    rows = small[i0] * (1 - t)[:, None] + small[i1] * t[:, None]
    out: np.ndarray = (rows[:, i0] * (1 - t)[None, :] + rows[:, i1] * t[None, :]).astype(np.float32)
    return out


def detect(
    A: np.ndarray,
    vendor: VendorProfile,
    rng: np.random.Generator,
    *,
    view: str = "PA",
    fov_mm: float | None = None,
    bone_mask: np.ndarray | None = None,
) -> Detected:
    """Expose the detector with ``A`` and process the result the way ``vendor`` does.

    ``bone_mask`` (outline of the bones, independent of their density) is left
    out of the auto-ranging histogram, so exposure processing never rescales
    an image because its bones are denser or fainter. The steps draw from
    ``rng`` in a fixed order (exposure, collimation, ranging, noise, markers).
    """
    spacing = (fov_mm or vendor.fov_mm) / A.shape[0]
    kvp, mas, S = _expose(A, vendor, rng, view, spacing)
    box = _collimation(A, vendor, rng)
    lo, hi = _auto_range(S, vendor, rng, box, bone_mask)
    val = _tone_curve(S, vendor, rng, lo, hi)
    _fill_collimation(val, vendor, box)
    marker = _burn_markers(val, vendor, rng, view, spacing, box)
    if vendor.annotation:
        _burn_text(val, vendor.annotation, rng, spacing, box)
    return Detected(
        stored=_stored_pixels(val, vendor),
        display=val.astype(np.float32),
        window=_voi_window(vendor),
        kvp=kvp,
        exposure_mas=round(mas, 2),
        field_box=box,
        marker=marker,
    )


def _expose(
    A: np.ndarray, vendor: VendorProfile, rng: np.random.Generator, view: str, spacing: float
) -> tuple[float, float, np.ndarray]:
    """(kVp, mAs, log signal): quantum-limited exposure with scatter, blur and multi-scale processing."""
    portable = view == "AP"
    lateral = view == "LAT"
    kvp = float(rng.choice([110.0, 115.0, 120.0, 125.0])) if not portable else float(rng.choice([85.0, 90.0, 95.0]))
    mas = float(np.exp(rng.normal(math.log(2.5 if not lateral else 8.0), 0.25)))
    # Automatic exposure control holds the dose behind the chest roughly
    # constant; what is left is the system's fluence and per-image jitter.
    fluence = 4.0e4 * vendor.exposure * float(np.exp(rng.normal(0.0, 0.25))) * (0.5 if portable else 1.0)
    photons = fluence * spacing * spacing  # per pixel at A = 0

    primary = np.exp(-A)
    spr = vendor.scatter * (2.5 if portable else 1.0) * (1.6 if lateral else 1.0)
    if spr > 0:
        primary = primary + spr * _lowpass(primary, 40.0 / spacing)
    sigma_px = vendor.blur_mm / spacing
    if sigma_px >= 0.3:
        primary = ndimage.gaussian_filter(primary, sigma_px, mode="nearest")
    noise = rng.standard_normal(A.shape, dtype=np.float32)
    counts = primary + np.sqrt(primary / photons) * noise
    S = -np.log(np.maximum(counts, 1e-4)).astype(np.float32)
    if vendor.detail_gain != 1.0 or vendor.range_compression != 1.0:
        # the "multi-frequency" processing every DR vendor ships: squeeze the
        # coarse range, lift local detail (ribs and spine through the heart)
        coarse = _lowpass(S, 12.0 / spacing)
        S = vendor.range_compression * coarse + vendor.detail_gain * (S - coarse)
    return kvp, mas, S


def _collimation(A: np.ndarray, vendor: VendorProfile, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The collimated field (r0, r1, c0, c1).

    The technologist closes the side blades onto the body's outline (so thin
    and broad patients fill the field alike) with a per-image gap; top and
    bottom blades vary freely. Never sees the bones.
    """
    n = A.shape[0]
    m = [min(0.2, vendor.collimation * float(np.exp(rng.normal(0.0, 0.6)))) for _ in range(4)]
    r0, r1 = int(round(m[0] * n)), n - int(round(m[1] * n))
    profile = A[n // 3 : 2 * n // 3].mean(axis=0)
    body = np.flatnonzero(profile > 1.0)
    b0, b1 = (int(body[0]), int(body[-1]) + 1) if body.size else (0, n)
    c0 = max(0, b0 - int(round(m[2] * n)))
    c1 = min(n, b1 + int(round(m[3] * n)))
    return r0, r1, c0, c1


def _auto_range(
    S: np.ndarray,
    vendor: VendorProfile,
    rng: np.random.Generator,
    box: tuple[int, int, int, int],
    bone_mask: np.ndarray | None,
) -> tuple[float, float]:
    """The (lo, hi) signal the display range spans, from bone-free pixels of the field.

    Anchors on air/lung (low) and thick soft tissue (the upper percentile);
    bone uses the headroom above ``display_range[1]``.
    """
    r0, r1, c0, c1 = box
    step = 2 if S.shape[0] < 256 else 4
    if (r1 - r0) > 8 and (c1 - c0) > 8:
        field_s, field_m = S[r0:r1:step, c0:c1:step], None if bone_mask is None else bone_mask[r0:r1:step, c0:c1:step]
    else:
        field_s, field_m = S[::step, ::step], None if bone_mask is None else bone_mask[::step, ::step]
    inside = field_s if field_m is None or field_m.all() else field_s[~field_m]
    lo, hi = np.percentile(inside, vendor.range_percentiles)
    rng_w = max(float(hi - lo), 1e-3)
    lo = float(lo) + float(rng.normal(0.0, vendor.range_jitter)) * rng_w
    hi = float(hi) + float(rng.normal(0.0, vendor.range_jitter)) * rng_w
    return lo, max(hi, lo + 0.2 * rng_w)


def _tone_curve(S: np.ndarray, vendor: VendorProfile, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Signal -> display value in [0, 1]: the response, the display range, a soft knee, electronic noise."""
    t = (S - lo) / (hi - lo)
    if vendor.response == "linear":
        k = vendor.linear_k * (hi - lo)
        t = (1.0 - np.exp(-k * t)) / (1.0 - math.exp(-k))
    d0, d1 = vendor.display_range
    val = d0 + t * (d1 - d0)
    # soft knee above the soft-tissue anchor: dense bone keeps its contrast
    # instead of clipping to white
    head = 1.0 - d1
    over = np.maximum(val - d1, 0.0)
    val = np.minimum(val, d1) + head * (1.0 - np.exp(-over / head))
    val = val + vendor.electronic_noise * rng.standard_normal(S.shape, dtype=np.float32)
    return np.clip(val, 0.0, 1.0)


def _fill_collimation(val: np.ndarray, vendor: VendorProfile, box: tuple[int, int, int, int]) -> None:
    """Outside the field: white (unexposed) or black (masked), as the vendor fills it."""
    n = val.shape[0]
    r0, r1, c0, c1 = box
    fill = 1.0 if vendor.collimation_fill == "white" else 0.0
    if r0 > 0:
        val[:r0] = fill
    if r1 < n:
        val[r1:] = fill
    if c0 > 0:
        val[:, :c0] = fill
    if c1 < n:
        val[:, c1:] = fill


def _burn_markers(
    val: np.ndarray,
    vendor: VendorProfile,
    rng: np.random.Generator,
    view: str,
    spacing: float,
    box: tuple[int, int, int, int],
) -> str | None:
    """Burn the lead-marker letters into the field's corners; returns the letters (None if none)."""
    if not (vendor.marker and rng.random() < vendor.marker_prob):
        return None
    n = val.shape[0]
    r0, _, c0, c1 = box
    lateral = view == "LAT"
    letters = ["L"] if lateral else (["R", "L"] if vendor.marker == "both" else [vendor.marker])
    h = max(5, int(round(14.0 / spacing)))
    for letter in letters:
        g = _glyph(letter, h)
        gh, gw = g.shape
        # R on the patient's right (image left in PA), L on the image right
        on_left = letter == "R" and not lateral
        top = min(max(r0 + int(rng.integers(2, max(3, n // 12))), 0), n - gh)
        if on_left:
            left = c0 + int(rng.integers(2, max(3, n // 12)))
        else:
            left = c1 - gw - int(rng.integers(2, max(3, n // 12)))
        left = min(max(left, 0), n - gw)
        val[top : top + gh, left : left + gw][g] = 1.0
    return "".join(letters)


def _stored_pixels(val: np.ndarray, vendor: VendorProfile) -> np.ndarray:
    """Display values -> stored integers: bit depth, MONOCHROME1 inversion, signed representation."""
    maxv = (1 << vendor.bits_stored) - 1
    ival = np.rint(val * maxv).astype(np.int64)
    if vendor.photometric == "MONOCHROME1":
        ival = maxv - ival
    if vendor.pixel_representation:
        ival = ival - (1 << (vendor.bits_stored - 1))
        signed: np.ndarray = ival.astype(np.int16)
        return signed
    unsigned: np.ndarray = ival.astype(np.uint16)
    return unsigned


def _voi_window(vendor: VendorProfile) -> tuple[float, float] | None:
    """(center, width) from lung to dense bone (most of the headroom), in modality-LUT units."""
    if not vendor.voi_window:
        return None
    d0, d1 = vendor.display_range
    maxv = (1 << vendor.bits_stored) - 1
    # in the stored MONOCHROME2 sense first
    a, b = d0 * maxv, (d1 + 0.85 * (1.0 - d1)) * maxv
    if vendor.photometric == "MONOCHROME1":
        a, b = maxv - b, maxv - a
    if vendor.pixel_representation:
        a -= 1 << (vendor.bits_stored - 1)
        b -= 1 << (vendor.bits_stored - 1)
    slope, icpt = vendor.rescale or (1.0, 0.0)
    a, b = sorted((a * slope + icpt, b * slope + icpt))
    width = (b - a) * 1.04
    return (round((a + b) / 2.0, 1), round(width, 1))


def dicom_dataset(
    det: Detected,
    vendor: VendorProfile,
    *,
    view: str,
    spacing_mm: float,
    patient: dict[str, str],
    study: dict[str, str],
    institution: str,
) -> Any:
    """A complete CR / DX For Presentation dataset (pydicom) around the stored pixels.

    ``patient``: PatientID, PatientName, PatientSex, PatientBirthDate, PatientAge.
    ``study``: StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, StudyDate,
    StudyTime, AccessionNumber, SeriesNumber, InstanceNumber.
    """
    from pydicom.dataset import Dataset

    sop_class = DX_PRESENTATION_STORAGE if vendor.modality == "DX" else CR_IMAGE_STORAGE
    ds = Dataset()
    _describe(ds, det, vendor, view, spacing_mm, patient, study, institution, sop_class)
    _image_pixel_module(ds, det, vendor, view)
    _encode_pixels(ds, det, vendor, sop_class)
    return ds


def _describe(
    ds: Any,
    det: Detected,
    vendor: VendorProfile,
    view: str,
    spacing_mm: float,
    patient: dict[str, str],
    study: dict[str, str],
    institution: str,
    sop_class: str,
) -> None:
    """Patient, study, series, equipment and acquisition tags."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = study["SOPInstanceUID"]
    ds.StudyDate = study["StudyDate"]
    ds.SeriesDate = study["StudyDate"]
    ds.ContentDate = study["StudyDate"]
    ds.StudyTime = study["StudyTime"]
    ds.SeriesTime = study["StudyTime"]
    ds.ContentTime = study["StudyTime"]
    ds.AccessionNumber = study["AccessionNumber"]
    ds.Modality = vendor.modality
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    lateral = view == "LAT"
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = "CHEST LAT" if lateral else f"CHEST {view}"
    ds.ManufacturerModelName = vendor.model
    ds.PatientName = patient["PatientName"]
    ds.PatientID = patient["PatientID"]
    ds.PatientBirthDate = patient["PatientBirthDate"]
    ds.PatientSex = patient["PatientSex"]
    ds.PatientAge = patient["PatientAge"]
    ds.BodyPartExamined = "CHEST"
    ds.KVP = f"{det.kvp:.0f}"
    ds.Exposure = int(round(det.exposure_mas))
    ds.ExposureInuAs = int(round(det.exposure_mas * 1000))
    ds.ImagerPixelSpacing = [f"{spacing_mm:.4f}", f"{spacing_mm:.4f}"]
    ds.PixelSpacing = [f"{spacing_mm:.4f}", f"{spacing_mm:.4f}"]
    if vendor.view_in_description_only:
        ds.ViewPosition = ""
    else:
        ds.ViewPosition = vendor.lateral_label if lateral else view
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = study["SeriesInstanceUID"]
    ds.StudyID = study["AccessionNumber"][-8:]
    ds.SeriesNumber = int(study["SeriesNumber"])
    ds.InstanceNumber = int(study["InstanceNumber"])


def _image_pixel_module(ds: Any, det: Detected, vendor: VendorProfile, view: str) -> None:
    """Orientation, the pixel description, modality LUT (rescale), VOI window and presentation tags."""
    lateral = view == "LAT"
    # rows run toward the patient's left (PA) or posterior (left lateral); columns toward the feet
    ds.PatientOrientation = ["P", "F"] if lateral else (["L", "F"] if view == "PA" else ["R", "F"])
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = vendor.photometric
    ds.Rows, ds.Columns = det.stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = vendor.bits_stored
    ds.HighBit = vendor.bits_stored - 1
    ds.PixelRepresentation = vendor.pixel_representation
    ds.BurnedInAnnotation = "YES" if det.marker else "NO"
    slope, icpt = vendor.rescale or (1.0, 0.0)
    if vendor.rescale is not None or vendor.modality == "DX":
        ds.RescaleIntercept = f"{icpt:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "US"
    if det.window is not None:
        ds.WindowCenter = f"{det.window[0]:g}"
        ds.WindowWidth = f"{det.window[1]:g}"
        ds.VOILUTFunction = "LINEAR"
    if vendor.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if vendor.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
    ds.LossyImageCompression = "00"


def _encode_pixels(ds: Any, det: Detected, vendor: VendorProfile, sop_class: str) -> None:
    """File meta and PixelData in the vendor's transfer syntax (explicit VR, RLE or JPEG 2000 lossless)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    arr = np.ascontiguousarray(det.stored)
    if vendor.transfer_syntax == "explicit":
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
    elif vendor.transfer_syntax == "rle":
        ds.compress(RLELossless, arr, encoding_plugin="gdcm", generate_instance_uid=False)
    else:
        # openjpeg logs one INFO line per tile; keep batch logs readable
        logging.getLogger("openjpeg").setLevel(logging.WARNING)
        ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def write_dicom(path: str, ds: Any) -> None:
    """Write a Part 10 file (preamble, file meta) so every reader accepts it."""
    from pydicom import dcmwrite

    dcmwrite(path, ds, enforce_file_format=True)
