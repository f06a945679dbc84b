"""Reading chest radiographs (DICOM CR/DX, PNG, JPEG) into a float image + metadata.

Image semantics: a 2-D ``float32`` array in which higher means more
attenuation (bone is bright). For DICOM the modality LUT (Rescale
Slope/Intercept or Modality LUT Sequence) is applied, then the VOI LUT or
window where present, then MONOCHROME1 is inverted; pydicom's decoders mask
the bits above BitsStored. The pixel transforms are pydicom's own
(``pydicom.pixels.apply_modality_lut`` / ``apply_voi_lut``); this module only
adds the checks and error types a batch needs.

Errors are subclasses of :class:`bonescreen.errors.ImageReadError`, each with
a machine-readable ``reason``. Messages never contain patient identifiers.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.dates import optional_date
from bonescreen.errors import (
    ImageReadError,
    MissingDecoderError,
    MissingTagError,
    MultiFrameError,
    NoPixelDataError,
    NotDicomError,
    WrongModalityError,
)
from bonescreen.labels import normalize_sex
from bonescreen.schema import LATERAL_VIEWS
from bonescreen.walk import walk_files

__all__ = [
    "DEFAULT_MODALITIES",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageMeta",
    "Sidecar",
    "TruncatedFileError",
    "UnsupportedImageError",
    "iter_image_files",
    "load_sidecar",
    "normalise_view",
    "parse_dicom_age",
    "read_dicom",
    "read_dicom_meta",
    "read_image",
    "read_meta",
    "sniff_format",
]

log = logging.getLogger(__name__)


class _NoTagValues(logging.Filter):
    """Drop pydicom's value-validation warnings: they quote tag values, which
    may be patient names or IDs, and those must never reach a log."""

    _PATTERNS = ("Invalid value for VR", "The value length", "exceeds the maximum length")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage() if record.args else str(record.msg)
        return not any(p in msg for p in self._PATTERNS)


_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _NoTagValues) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_NoTagValues())

#: CR and DX are the radiography modalities; DR and RG are older/non-standard
#: spellings that real archives still contain.
DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG")
IMAGE_EXTENSIONS = (".dcm", ".dicom", ".dic", ".ima", ".png", ".jpg", ".jpeg")


class TruncatedFileError(ImageReadError):
    """The file ends before its header or pixel data do."""

    reason = "truncated"


class CorruptImageError(ImageReadError):
    """The header or the compressed pixel stream cannot be decoded."""

    reason = "corrupt"


class UnsupportedImageError(ImageReadError):
    """Readable, but not a grayscale 2-D radiograph (colour, float pixels, ...)."""

    reason = "unsupported_image"


# --- metadata ---------------------------------------------------------------


@dataclass
class ImageMeta:
    """Header facts the cohort and screening stages need; see docs/ARCHITECTURE.md."""

    path: str
    source: str  # "dicom" | "png" | "jpeg"
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    study_date: dt.date | None = None
    age: float | None = None
    birth_date: dt.date | None = field(default=None, repr=False)
    sex: str | None = None
    view: str | None = None
    modality: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    # study level and per-scanner monitoring
    accession_number: str | None = None
    sop_class_uid: str | None = None
    manufacturer_model_name: str | None = None
    # anatomy: what the header says was imaged (bonescreen.screen.gate.classify_anatomy)
    anatomic_region_code: str | None = None  # AnatomicRegionSequence[0].CodeValue
    anatomic_region_meaning: str | None = None  # ... .CodeMeaning
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None

    @property
    def is_frontal(self) -> bool:
        return self.view in ("PA", "AP")

    @property
    def is_lateral(self) -> bool:
        return self.view in LATERAL_VIEWS


def parse_dicom_age(value: object) -> float | None:
    """DICOM AS (``"065Y"``, ``"006M"``, ``"012W"``, ``"030D"``) to years; plain numbers pass."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD])?", text)
    if not m:
        return None
    n = float(m.group(1))
    unit = m.group(2) or "Y"
    years = {"Y": n, "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[unit]
    return years if 0 <= years < 150 else None


_VIEW_ALIASES = {
    "PA": "PA",
    "POSTERO-ANTERIOR": "PA",
    "POSTEROANTERIOR": "PA",
    "POSTERO_ANTERIOR": "PA",
    "AP": "AP",
    "ANTERO-POSTERIOR": "AP",
    "ANTEROPOSTERIOR": "AP",
    "ANTERO_POSTERIOR": "AP",
    "AP SUPINE": "AP",
    "AP ERECT": "AP",
    **{v: "LAT" for v in LATERAL_VIEWS},
}
# the one-word spellings (LAT, LATERAL, LL, RL, LLAT, RLAT) as words of free text ("THORAX LAT")
_TEXT_LATERAL = re.compile(r"\b(" + "|".join(v for v in LATERAL_VIEWS if v.isalpha()) + r")\b")
_TEXT_PA = re.compile(r"\bPA\b|POSTERO[-_ ]?ANTERIOR")
_TEXT_AP = re.compile(r"\bAP\b|ANTERO[-_ ]?POSTERIOR")


def normalise_view(value: object) -> str | None:
    """Map a view string onto ``PA`` / ``AP`` / ``LAT``; other non-empty values upper-cased."""
    if value is None:
        return None
    text = re.sub(r"\s+", " ", str(value).strip().upper())
    if not text:
        return None
    return _VIEW_ALIASES.get(text, text)


def _view_from_text(*texts: object) -> str | None:
    """A view from free text ("CHEST PA", "THORAX LAT"); None when absent or ambiguous."""
    found = set()
    for t in texts:
        if not t:
            continue
        s = str(t).upper()
        if _TEXT_LATERAL.search(s):
            found.add("LAT")
        if _TEXT_PA.search(s):
            found.add("PA")
        if _TEXT_AP.search(s):
            found.add("AP")
    return found.pop() if len(found) == 1 else None


def _dicom_view(ds: Any) -> str | None:
    """ViewPosition, then the coded view, then PatientOrientation, then descriptions.

    ImageLaterality (L/R/B/U) names the side of the body, not the projection,
    so it is deliberately not used to decide frontal vs lateral.
    """
    view = normalise_view(ds.get("ViewPosition"))
    if view:
        return view
    for item in ds.get("ViewCodeSequence") or []:
        view = _view_from_text(item.get("CodeMeaning"))
        if view:
            return view
    orient = ds.get("PatientOrientation")
    if orient is not None and not isinstance(orient, str) and len(orient) >= 1:
        row_dir = str(orient[0]).upper()
        # Rows running anterior/posterior means the beam went left-right: a lateral.
        if row_dir[:1] in ("A", "P"):
            return "LAT"
    return _view_from_text(
        ds.get("SeriesDescription"),
        ds.get("ProtocolName"),
        ds.get("AcquisitionDeviceProcessingDescription"),
        ds.get("StudyDescription"),
    )


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _meta_from_dataset(ds: Any, path: str) -> ImageMeta:
    study_date = None
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        study_date = optional_date(ds.get(kw))
        if study_date:
            break
    birth = optional_date(ds.get("PatientBirthDate"))
    age = parse_dicom_age(ds.get("PatientAge"))
    if age is None and birth and study_date and study_date >= birth:
        age = (study_date - birth).days / 365.25
    spacing = None
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        val = ds.get(kw)
        try:
            if val is not None and len(val) == 2 and float(val[0]) > 0 and float(val[1]) > 0:
                spacing = (float(val[0]), float(val[1]))
                break
        except (TypeError, ValueError):
            continue
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    region = _anatomic_region(ds)

    def _int(kw: str) -> int | None:
        try:
            v = ds.get(kw)
            return int(v) if v is not None and v != "" else None
        except (TypeError, ValueError):
            return None

    return ImageMeta(
        path=path,
        source="dicom",
        sop_instance_uid=_str_or_none(ds.get("SOPInstanceUID")),
        study_instance_uid=_str_or_none(ds.get("StudyInstanceUID")),
        series_instance_uid=_str_or_none(ds.get("SeriesInstanceUID")),
        patient_id=_str_or_none(ds.get("PatientID")),
        study_date=study_date,
        age=age,
        birth_date=birth,
        sex=normalize_sex(ds.get("PatientSex")),
        view=_dicom_view(ds),
        modality=_str_or_none(ds.get("Modality")),
        body_part=_str_or_none(ds.get("BodyPartExamined")),
        manufacturer=_str_or_none(ds.get("Manufacturer")),
        pixel_spacing=spacing,
        rows=_int("Rows"),
        columns=_int("Columns"),
        photometric=_str_or_none(ds.get("PhotometricInterpretation")),
        bits_stored=_int("BitsStored"),
        transfer_syntax=str(ts) if ts else None,
        accession_number=_str_or_none(ds.get("AccessionNumber")),
        sop_class_uid=_str_or_none(ds.get("SOPClassUID")),
        manufacturer_model_name=_str_or_none(ds.get("ManufacturerModelName")),
        anatomic_region_code=region[0],
        anatomic_region_meaning=region[1],
        study_description=_str_or_none(ds.get("StudyDescription")),
        series_description=_str_or_none(ds.get("SeriesDescription")),
        protocol_name=_str_or_none(ds.get("ProtocolName")),
    )


def _anatomic_region(ds: Any) -> tuple[str | None, str | None]:
    """(code value, code meaning) of the first AnatomicRegionSequence item; (None, None) if absent."""
    try:
        seq = ds.get("AnatomicRegionSequence")
        item = seq[0] if seq else None
    except Exception:  # a malformed sequence says nothing usable about the anatomy
        return None, None
    if item is None:
        return None, None
    return _str_or_none(item.get("CodeValue")), _str_or_none(item.get("CodeMeaning"))


# --- format sniffing --------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble starts with a group 0002/0008 tag.

    pydicom's ``force=True`` reads anything; this check keeps random bytes and
    text from being parsed as an empty dataset.
    """
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    if group not in (0x0002, 0x0008):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR
    length = int.from_bytes(head[4:8], "little")
    return length < 0x10000  # implicit VR: a plausible element length


def sniff_format(path: str | os.PathLike[str]) -> str:
    """``"dicom"``, ``"png"`` or ``"jpeg"`` from the file's first bytes, else ``NotDicomError``."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{p}: file not found", reason="not_found") from exc
    except IsADirectoryError as exc:
        raise NotDicomError(f"{p}: is a directory") from exc
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot open ({exc.strerror})") from exc
    if not head:
        raise NotDicomError(f"{p}: empty file", reason="empty_file")
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if _looks_like_bare_dicom(head):
        return "dicom"
    if len(head) < 132 and head[:128].strip(b"\x00") == b"":
        raise TruncatedFileError(f"{p}: file ends inside the DICOM preamble")
    raise NotDicomError(f"{p}: not a DICOM, PNG or JPEG file")


# --- DICOM ------------------------------------------------------------------

# Which pip package decodes what; only permissively licensed ones are named
# (pylibjpeg-libjpeg is GPL and deliberately not suggested).
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pillow or python-gdcm",
    "1.2.840.10008.1.2.4.51": "pillow or python-gdcm",
    "1.2.840.10008.1.2.4.57": "python-gdcm",
    "1.2.840.10008.1.2.4.70": "python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg + pylibjpeg-rle (pydicom's own RLE decoder should not be missing)",
}


def _dcmread(path: Path, *, stop_before_pixels: bool) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    fmt = sniff_format(path)
    if fmt != "dicom":
        raise NotDicomError(f"{path}: a {fmt.upper()} file, not DICOM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            _check_complete(ds, path, stop_before_pixels=stop_before_pixels)
            # Touch every element now so lazy parsing errors surface here.
            for _ in ds.iterall():
                pass
    except ImageReadError:
        raise
    except (EOFError, OSError) as exc:
        raise TruncatedFileError(f"{path}: DICOM header ends early ({exc})") from exc
    except Exception as exc:
        msg = str(exc)
        if any(w in msg.lower() for w in ("end of file", "truncat", "bytes remaining", "eof")):
            raise TruncatedFileError(f"{path}: DICOM header ends early ({msg})") from exc
        raise CorruptImageError(f"{path}: cannot parse DICOM header ({type(exc).__name__}: {msg})") from exc
    return ds


def _check_complete(ds: Any, path: Path, *, stop_before_pixels: bool) -> None:
    """Raise ``TruncatedFileError`` when the file ends inside the dataset.

    pydicom stops quietly at end of file, so a cut-off header would look like
    a valid file without pixel data; compare where the last element ends with
    the file size instead.
    """
    size = path.stat().st_size
    if len(ds) == 0:
        if getattr(ds, "preamble", None) is not None or len(getattr(ds, "file_meta", []) or []):
            raise TruncatedFileError(f"{path}: file ends after the DICOM file meta header")
        raise NotDicomError(f"{path}: no DICOM data elements")
    last = ds.get_item(max(ds.keys()))
    tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return  # already converted or undefined length: nothing cheap to compare
    end = int(tell) + int(length)
    if end > size:
        raise TruncatedFileError(f"{path}: file ends inside a DICOM element ({size} of {end} bytes)")
    if not stop_before_pixels and "PixelData" not in ds and size > end:
        raise TruncatedFileError(f"{path}: {size - end} unparsed bytes at the end of the header")


def _check_required(ds: Any, path: Path, require: Sequence[str]) -> None:
    missing = [kw for kw in require if _str_or_none(ds.get(kw)) is None]
    if missing:
        raise MissingTagError(f"{path}: missing or empty required tag(s): {', '.join(missing)}")


def read_dicom_meta(path: str | os.PathLike[str], *, require: Sequence[str] = ()) -> ImageMeta:
    """Header only (``stop_before_pixels``): fast enough to index a whole archive."""
    p = Path(path)
    ds = _dcmread(p, stop_before_pixels=True)
    _check_required(ds, p, require)
    return _meta_from_dataset(ds, str(path))


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _lut_depth(item: Any) -> int:
    return int(item.LUTDescriptor[2])


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    fm = getattr(ds, "file_meta", None)
    ts = getattr(fm, "TransferSyntaxUID", None) if fm is not None else None
    if ts:
        return UID(str(ts))
    # No file meta (bare stream): infer from how pydicom parsed it.
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _check_decoder(ts: Any, path: Path) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        name = getattr(ts, "name", str(ts))
        raise MissingDecoderError(
            f"{path}: no pixel decoder exists for transfer syntax {ts} ({name}); "
            "convert the file (e.g. with dcmtk's dcmdjpeg/dcmconv or gdcmconv --raw)"
        ) from exc
    if not decoder.is_available:
        hint = _DECODER_HINTS.get(str(ts), "python-gdcm")
        raise MissingDecoderError(
            f"{path}: transfer syntax {ts.name} needs a decoder that is not installed; "
            f"pip install {hint}"
        )


def _decode(ds: Any, path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr: np.ndarray = ds.pixel_array
            return arr
    except MemoryError:
        raise
    except Exception as exc:
        msg = str(exc)
        low = msg.lower()
        if any(w in low for w in ("less than expected", "truncat", "end of", "too short", "insufficient")):
            raise TruncatedFileError(f"{path}: pixel data shorter than the header says ({msg})") from exc
        raise CorruptImageError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {msg})") from exc


def _check_pixel_module(ds: Any, p: Path, photometric: str) -> None:
    """A single-frame, one-sample, MONOCHROME1/2 image with its pixel tags; else the specific error."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImageError(f"{p}: float pixel data is not a radiograph")
        raise NoPixelDataError(f"{p}: no pixel data (a report, presentation state or header-only file)")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        raise MultiFrameError(f"{p}: {n_frames} frames; expected a single-frame radiograph")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"{p}: photometric interpretation {photometric or 'missing'}; expected MONOCHROME1/2"
        )
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise UnsupportedImageError(f"{p}: {ds.SamplesPerPixel} samples per pixel; expected 1")
    for kw in ("BitsStored", "BitsAllocated", "Rows", "Columns"):
        if ds.get(kw) in (None, ""):
            raise MissingTagError(f"{p}: missing image pixel tag {kw}")


def _modality_lut(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, float, float]:
    """The modality LUT or rescale applied, and the output range it maps the stored range onto."""
    from pydicom.pixels.processing import apply_modality_lut

    lo, hi = _stored_range(ds)
    mlut = ds.get("ModalityLUTSequence")
    if mlut:
        lo, hi = 0.0, float(2 ** _lut_depth(mlut[0]) - 1)
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * s + b, hi * s + b))
    return apply_modality_lut(arr, ds), lo, hi


def _voi_lut(arr: np.ndarray, ds: Any, p: Path, lo: float, hi: float) -> tuple[np.ndarray, float, float]:
    """The VOI LUT or window applied (pydicom), and the range its output spans."""
    from pydicom.pixels.processing import apply_voi_lut

    mlut = ds.get("ModalityLUTSequence")
    voi_seq = ds.get("VOILUTSequence")
    has_lut = bool(voi_seq) and None not in (voi_seq[0].get("LUTDescriptor"), voi_seq[0].get("LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)  # integral after rescale: a LUT index
        lo, hi = 0.0, float(2 ** _lut_depth(voi_seq[0]) - 1)
    elif has_window:
        # apply_windowing's y_min/y_max: stored range, through the modality LUT
        lo, hi = _stored_range(ds)
        if mlut:
            lo, hi = 0.0, float(2 ** _lut_depth(mlut[0]) - 1)
        if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
            s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = lo * s + b, hi * s + b
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        raise CorruptImageError(f"{p}: invalid VOI LUT / window ({exc})") from exc
    return arr, lo, hi


def read_dicom(
    path: str | os.PathLike[str],
    *,
    allowed_modalities: Sequence[str] | None = DEFAULT_MODALITIES,
    require: Sequence[str] = (),
    apply_voi: bool = True,
) -> tuple[np.ndarray, ImageMeta]:
    """Decode a single-frame grayscale radiograph; bone bright, float32.

    ``allowed_modalities=None`` accepts any modality (a missing Modality tag
    is accepted too). ``require`` lists tag keywords that must be present and
    non-empty (e.g. ``("PatientID", "StudyDate")``). ``apply_voi=False``
    skips the VOI LUT / window (the modality LUT is always applied).
    """
    p = Path(path)
    ds = _dcmread(p, stop_before_pixels=False)
    _check_required(ds, p, require)
    meta = _meta_from_dataset(ds, str(path))

    modality = (meta.modality or "").upper()
    if allowed_modalities is not None and modality and modality not in {m.upper() for m in allowed_modalities}:
        raise WrongModalityError(
            f"{p}: modality {modality} is not a radiograph (allowed: {', '.join(allowed_modalities)})"
        )
    photometric = (meta.photometric or "").upper()
    _check_pixel_module(ds, p, photometric)
    ts = _transfer_syntax(ds)
    _check_decoder(ts, p)
    arr = _decode(ds, p)
    if arr.ndim != 2:
        raise UnsupportedImageError(f"{p}: decoded pixel array has shape {arr.shape}; expected 2-D")
    # Track the output range of each step so MONOCHROME1 inverts about the
    # range's midpoint, mirroring the stored range exactly.
    arr, lo, hi = _modality_lut(arr, ds)
    if apply_voi:
        arr, lo, hi = _voi_lut(arr, ds, p, lo, hi)
    arr = np.asarray(arr, dtype=np.float64)
    inverse_shape = str(ds.get("PresentationLUTShape") or "").upper() == "INVERSE"
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and inverse_shape):
        arr = (lo + hi) - arr
    return arr.astype(np.float32), meta


# --- PNG / JPEG + sidecar ---------------------------------------------------


def _norm_key(path: str | os.PathLike[str]) -> str:
    return os.path.normcase(os.path.normpath(str(path)))


@dataclass
class Sidecar:
    """Metadata rows for PNG/JPEG images, looked up by path or file name.

    A row matches an image when its ``path`` (absolute, or relative to the
    sidecar's folder) resolves to the image, or its ``filename`` / the path's
    base name equals the image's file name (used only when unambiguous).
    """

    source: str
    by_path: dict[str, dict[str, str]] = field(default_factory=dict)
    by_name: dict[str, dict[str, str]] = field(default_factory=dict)
    ambiguous_names: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.by_path) + len(self.by_name)

    def lookup(self, image_path: str | os.PathLike[str]) -> dict[str, str] | None:
        p = Path(image_path)
        row = self.by_path.get(_norm_key(p.resolve()))
        if row is not None:
            return row
        if p.name in self.ambiguous_names:
            return None
        return self.by_name.get(p.name)


_SIDECAR_ALIASES = {
    "file": "filename",
    "image": "path",
    "image_path": "path",
    "file_name": "filename",
    "image_index": "filename",  # NIH ChestX-ray14 Data_Entry_2017.csv
    "patientid": "patient_id",
    "patient_sex": "sex",
    "patient_gender": "sex",
    "gender": "sex",
    "patient_age": "age",
    "view_position": "view",
    "viewposition": "view",
    "frontal/lateral": "view",
    "date": "study_date",
    "studydate": "study_date",
}


def load_sidecar(path: str | os.PathLike[str]) -> Sidecar:
    """Read a CSV with a ``path`` or ``filename`` column plus metadata columns.

    Recognised columns: ``patient_id, study_date, age, sex, view, birth_date,
    study_instance_uid, sop_instance_uid, modality, manufacturer, body_part,
    pixel_spacing`` (plus a few common spellings such as NIH's "Image Index").
    """
    from bonescreen.errors import TableError

    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise TableError(f"{p}: empty sidecar table")
            rename = {}
            for col in reader.fieldnames:
                key = re.sub(r"\s+", "_", col.strip().lower())
                rename[col] = _SIDECAR_ALIASES.get(key, key)
            if "path" not in rename.values() and "filename" not in rename.values():
                raise TableError(f"{p}: sidecar needs a 'path' or 'filename' column")
            rows = [{rename[k]: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except OSError as exc:
        raise TableError(f"{p}: cannot read sidecar ({exc.strerror})") from exc
    side = Sidecar(source=str(p))
    base = p.resolve().parent
    for row in rows:
        rp = row.get("path")
        if rp:
            full = Path(rp) if Path(rp).is_absolute() else base / rp
            side.by_path[_norm_key(full.resolve())] = row
        name = row.get("filename") or (Path(rp).name if rp else "")
        if name:
            if name in side.by_name and side.by_name[name] is not row:
                side.ambiguous_names.add(name)
            side.by_name[name] = row
    return side


def _meta_from_row(path: str, source: str, row: Mapping[str, Any] | None, shape: tuple[int, int], mode: str) -> ImageMeta:
    row = row or {}
    study_date = optional_date(row.get("study_date"))
    birth = optional_date(row.get("birth_date"))
    age = parse_dicom_age(row.get("age"))
    if age is None and birth and study_date and study_date >= birth:
        age = (study_date - birth).days / 365.25
    spacing = None
    raw = row.get("pixel_spacing")
    if raw:
        parts = re.split(r"[\\,; x]+", str(raw).strip())
        try:
            vals = [float(v) for v in parts if v]
            if len(vals) == 1:
                spacing = (vals[0], vals[0])
            elif len(vals) == 2:
                spacing = (vals[0], vals[1])
        except ValueError:
            spacing = None
    return ImageMeta(
        path=path,
        source=source,
        sop_instance_uid=_str_or_none(row.get("sop_instance_uid")),
        study_instance_uid=_str_or_none(row.get("study_instance_uid")),
        series_instance_uid=_str_or_none(row.get("series_instance_uid")),
        patient_id=_str_or_none(row.get("patient_id")),
        study_date=study_date,
        age=age,
        birth_date=birth,
        sex=normalize_sex(row.get("sex")),
        view=normalise_view(row.get("view")),
        modality=_str_or_none(row.get("modality")),
        body_part=_str_or_none(row.get("body_part")),
        manufacturer=_str_or_none(row.get("manufacturer")),
        pixel_spacing=spacing,
        rows=shape[0],
        columns=shape[1],
        photometric="MONOCHROME2",
        bits_stored=16 if mode.startswith("I") else 8,
        transfer_syntax=None,
        accession_number=_str_or_none(row.get("accession_number")),
        manufacturer_model_name=_str_or_none(row.get("manufacturer_model_name")),
        study_description=_str_or_none(row.get("study_description")),
        series_description=_str_or_none(row.get("series_description")),
        protocol_name=_str_or_none(row.get("protocol_name")),
    )


def _resolve_sidecar(path: str, sidecar: Sidecar | Mapping[str, Any] | str | os.PathLike[str] | None) -> Mapping[str, Any] | None:
    if sidecar is None:
        return None
    if isinstance(sidecar, Sidecar):
        return sidecar.lookup(path)
    if isinstance(sidecar, Mapping):
        return sidecar
    return load_sidecar(sidecar).lookup(path)


def _read_raster(p: Path, fmt: str) -> tuple[np.ndarray, str]:
    """PNG/JPEG to 2-D float32; colour is converted to luminance (ITU-R 601)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as opened:
            im = ImageOps.exif_transpose(opened)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im).astype(np.float32)
            elif mode == "L":
                arr = np.asarray(im, dtype=np.uint8).astype(np.float32)
            elif mode in ("LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "1", "La"):
                arr = np.asarray(im.convert("L"), dtype=np.uint8).astype(np.float32)
            else:
                raise UnsupportedImageError(f"{p}: unsupported {fmt.upper()} mode {mode}")
    except UnsupportedImageError:
        raise
    except UnidentifiedImageError as exc:
        raise CorruptImageError(f"{p}: cannot decode {fmt.upper()}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise TruncatedFileError(f"{p}: {fmt.upper()} file is truncated ({msg})") from exc
        raise CorruptImageError(f"{p}: cannot decode {fmt.upper()} ({msg})") from exc
    if arr.ndim != 2:
        raise UnsupportedImageError(f"{p}: decoded {fmt.upper()} has shape {arr.shape}; expected 2-D")
    return arr, mode


def read_image(
    path: str | os.PathLike[str],
    sidecar: Sidecar | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    allowed_modalities: Sequence[str] | None = DEFAULT_MODALITIES,
    require: Sequence[str] = (),
    apply_voi: bool = True,
) -> tuple[np.ndarray, ImageMeta]:
    """DICOM, PNG or JPEG (decided by content, not extension) to ``(float32 image, ImageMeta)``.

    For PNG/JPEG, pixel values are taken as they are (bright = bone, as in
    NIH ChestX-ray14 and CheXpert) and metadata comes from ``sidecar``: a
    :class:`Sidecar`, a path to one, or this image's row as a mapping.
    ``require`` applies to DICOM tags, or to sidecar columns for PNG/JPEG.
    """
    p = Path(path)
    fmt = sniff_format(p)
    if fmt == "dicom":
        return read_dicom(p, allowed_modalities=allowed_modalities, require=require, apply_voi=apply_voi)
    arr, mode = _read_raster(p, fmt)
    row = _resolve_sidecar(str(path), sidecar)
    if require:
        missing = [k for k in require if not _str_or_none((row or {}).get(_snake(k)))]
        if missing:
            raise MissingTagError(f"{p}: sidecar lacks required field(s): {', '.join(missing)}")
    return arr, _meta_from_row(str(path), fmt, row, arr.shape, mode)


def _snake(name: str) -> str:
    """DICOM keyword to sidecar column: ``PatientID`` -> ``patient_id``."""
    special = {"PatientID": "patient_id", "PatientSex": "sex", "PatientAge": "age", "ViewPosition": "view",
               "PatientBirthDate": "birth_date"}
    if name in special:
        return special[name]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def read_meta(
    path: str | os.PathLike[str],
    sidecar: Sidecar | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    require: Sequence[str] = (),
) -> ImageMeta:
    """Metadata of any supported image without decoding DICOM pixels."""
    p = Path(path)
    fmt = sniff_format(p)
    if fmt == "dicom":
        return read_dicom_meta(p, require=require)
    from PIL import Image

    try:
        with Image.open(p) as im:
            shape, mode = (im.height, im.width), im.mode
    except Exception as exc:
        raise CorruptImageError(f"{p}: cannot open {fmt.upper()} ({exc})") from exc
    row = _resolve_sidecar(str(path), sidecar)
    if require:
        missing = [k for k in require if not _str_or_none((row or {}).get(_snake(k)))]
        if missing:
            raise MissingTagError(f"{p}: sidecar lacks required field(s): {', '.join(missing)}")
    return _meta_from_row(str(path), fmt, row, shape, mode)


# --- finding files ----------------------------------------------------------


def _is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    if suffix and not re.fullmatch(r"\.\d+", suffix):
        return False  # .csv, .txt, .json, ...; numeric suffixes are common DICOM names
    try:  # extension-less files (PACS exports): look at the bytes
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _looks_like_bare_dicom(head)


def iter_image_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], recursive: bool = True
) -> Iterator[Path]:
    """Image files under the given files/folders, sorted, each once.

    Files named explicitly are yielded as given (a bad one is for the reader
    to report); inside folders only image extensions and extension-less files
    that start like DICOM are taken.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found: Iterable[Path] = (f for f in walk_files(p, recursive=recursive) if _is_candidate(f))
        else:
            found = [p]
        for f in found:
            key = _norm_key(f.resolve()) if f.exists() else _norm_key(f)
            if key not in seen:
                seen.add(key)
                yield f
