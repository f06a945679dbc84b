"""bonescreen.io: DICOM / PNG / JPEG decoding semantics, metadata and typed errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonescreen import io as bio
from bonescreen.errors import (
    ImageReadError,
    MissingDecoderError,
    MissingTagError,
    MultiFrameError,
    NoPixelDataError,
    NotDicomError,
    WrongModalityError,
)
from bonescreen.preprocess import preprocess_array

MAX12 = 4095


def anatomy(h: int = 40, w: int = 48) -> np.ndarray:
    """Attenuation map, 12-bit: air 200, soft tissue ~1500, a bright 'spine' 3500, some texture."""
    rng = np.random.default_rng(0)
    img = np.full((h, w), 200, dtype=np.int32)
    img[4:-4, 6:-6] = 1500
    img[:, w // 2 - 3 : w // 2 + 3] = 3500
    img += rng.integers(0, 50, size=img.shape)
    return img.astype(np.uint16)


# --- pixel semantics ----------------------------------------------------------


def test_monochrome1_is_inverted_so_bone_is_bright(write_dicom):
    att = anatomy()
    p2 = write_dicom(att, "m2.dcm", photometric="MONOCHROME2")
    p1 = write_dicom(MAX12 - att, "m1.dcm", photometric="MONOCHROME1")
    img2, meta2 = bio.read_image(p2)
    img1, meta1 = bio.read_image(p1)
    assert meta1.photometric == "MONOCHROME1" and meta2.photometric == "MONOCHROME2"
    assert img1.dtype == np.float32 and img1.shape == att.shape
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(img2, att.astype(np.float32))
    w = att.shape[1]
    assert img1[:, w // 2].mean() > img1[20, 8] > img1[0, 0]  # spine > soft tissue > air


def test_monochrome1_with_mirrored_window_matches_monochrome2(write_dicom):
    att = anatomy()
    c, wd = 1800, 2400
    p2 = write_dicom(att, "m2.dcm", WindowCenter=c, WindowWidth=wd)
    p1 = write_dicom(MAX12 - att, "m1.dcm", photometric="MONOCHROME1", WindowCenter=MAX12 - c + 1, WindowWidth=wd)
    img2, _ = bio.read_image(p2)
    img1, _ = bio.read_image(p1)
    np.testing.assert_allclose(img1, img2, atol=1e-3)


def test_voi_window_applied(write_dicom):
    att = anatomy()
    c, wd = 1500.5, 1001  # LINEAR window covering [1000, 2000]
    path = write_dicom(att, WindowCenter=c, WindowWidth=wd)
    img, _ = bio.read_image(path)
    assert img[att <= 1000].max() == 0  # below the window -> output minimum
    assert img[att > 2000].min() == MAX12  # above -> output maximum
    inside = (att > 1000) & (att <= 2000)
    expected = ((att[inside] - (c - 0.5)) / (wd - 1) + 0.5) * MAX12
    np.testing.assert_allclose(img[inside], expected, rtol=1e-5)
    raw, _ = bio.read_image(path, apply_voi=False)
    np.testing.assert_array_equal(raw, att.astype(np.float32))


def test_voi_lut_sequence_applied(write_dicom):
    from pydicom.dataset import Dataset

    att = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).astype(np.uint16)  # 0..4032
    item = Dataset()
    # 4096 entries starting at 0, 16-bit output: a square-root curve
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.astype("<u2").tobytes()
    path = write_dicom(att, VOILUTSequence=[item])
    img, _ = bio.read_image(path)
    np.testing.assert_array_equal(img, lut[att].astype(np.float32))


def test_modality_rescale_applied(write_dicom):
    att = anatomy()
    path = write_dicom(att, RescaleSlope=2, RescaleIntercept=-1000)
    img, _ = bio.read_image(path)
    np.testing.assert_allclose(img, att * 2.0 - 1000, rtol=0, atol=1e-3)


def test_rescale_then_window_in_output_units(write_dicom):
    att = anatomy()
    # window [0, 2000] in rescaled units == stored [500, 1500]
    path = write_dicom(att, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000.5, WindowWidth=2001)
    img, _ = bio.read_image(path)
    assert img[att <= 500].max() == img.min()
    assert img[att > 1500].min() == img.max()
    assert img.max() > img.min()


def test_bits_stored_masks_garbage_high_bits(write_dicom):
    att = anatomy()
    clean = write_dicom(att, "clean.dcm", bits_stored=12)
    dirty_px = att | np.uint16(0xA000)  # junk in bits 13..16, outside BitsStored=12
    dirty = write_dicom(dirty_px, "dirty.dcm", bits_stored=12)
    a, _ = bio.read_image(clean)
    b, _ = bio.read_image(dirty)
    np.testing.assert_array_equal(a, b)


def test_signed_pixels_and_mono1_inversion(write_dicom):
    att = anatomy().astype(np.int32) - 2048  # 12-bit signed
    p2 = write_dicom(att, "s2.dcm", signed=True)
    p1 = write_dicom(-1 - att, "s1.dcm", signed=True, photometric="MONOCHROME1")  # mirror of the signed range
    a, _ = bio.read_image(p2)
    b, _ = bio.read_image(p1)
    np.testing.assert_array_equal(a, att.astype(np.float32))
    np.testing.assert_array_equal(a, b)


# --- real radiograph, several transfer syntaxes -----------------------------------


@pytest.fixture(scope="module")
def rg1_full(pydicom_data_dir: Path) -> np.ndarray:
    img, meta = bio.read_image(pydicom_data_dir / "RG1_UNCR.dcm")
    assert meta.modality == "CR" and meta.photometric == "MONOCHROME1" and meta.view == "PA"
    return img


def test_real_cr_uncompressed_equals_jpeg2000_lossless(pydicom_data_dir: Path, rg1_full: np.ndarray):
    j2k, meta = bio.read_image(pydicom_data_dir / "RG1_J2KR.dcm")
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.90"
    np.testing.assert_array_equal(j2k, rg1_full)
    np.testing.assert_array_equal(preprocess_array(j2k), preprocess_array(rg1_full))


def test_real_cr_bone_is_bright(rg1_full: np.ndarray):
    pp = preprocess_array(rg1_full, 256)
    spine = pp[60:190, 120:136].mean()  # the mediastinum / thoracic spine column
    lung = pp[60:190, 60:90].mean()  # right lung field
    assert spine > lung + 40


@pytest.fixture(scope="module")
def rg1_crop(pydicom_data_dir: Path, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 256x256 crop of RG1 (keeps the compression round-trips fast)."""
    import pydicom

    ds = pydicom.dcmread(pydicom_data_dir / "RG1_UNCR.dcm")
    arr = ds.pixel_array[800:1056, 700:956].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    out = tmp_path_factory.mktemp("rg1") / "crop_unc.dcm"
    ds.save_as(out)
    return out, arr


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_crop_matches_uncompressed(rg1_crop, syntax: str, tmp_path: Path):
    import pydicom
    import pydicom.uid

    from pydicom.pixels import get_encoder

    src, _arr = rg1_crop
    ds = pydicom.dcmread(src)
    uid = getattr(pydicom.uid, syntax)
    if not get_encoder(uid).is_available:  # encoding needs pyjpegls / pylibjpeg-openjpeg (test extras)
        pytest.skip(f"no {syntax} encoder installed: {get_encoder(uid).missing_dependencies}")
    ds.compress(uid)
    out = tmp_path / f"{syntax}.dcm"
    ds.save_as(out)
    ref, _ = bio.read_image(src)
    img, meta = bio.read_image(out)
    assert meta.transfer_syntax == str(uid)
    np.testing.assert_array_equal(img, ref)


def test_jpeg_lossless_sv1_via_gdcm(rg1_crop, tmp_path: Path):
    gdcm = pytest.importorskip("gdcm")
    src, _ = rg1_crop
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    out = tmp_path / "jll.dcm"
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ref, _ = bio.read_image(src)
    img, meta = bio.read_image(out)
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(img, ref)


# --- metadata -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,years",
    [("065Y", 65.0), ("006M", 0.5), ("052W", 52 * 7 / 365.25), ("030D", 30 / 365.25), ("", None), ("abc", None)],
)
def test_parse_dicom_age(value: str, years):
    got = bio.parse_dicom_age(value)
    assert got == pytest.approx(years) if years is not None else got is None


def test_meta_age_from_birth_date_and_header_fields(write_dicom):
    path = write_dicom(
        anatomy(), PatientAge="", PatientBirthDate="19600115", StudyDate="20240115", PatientSex="M",
        PixelSpacing=[0.15, 0.16], Manufacturer="ACME",
    )
    meta = bio.read_dicom_meta(path)
    assert meta.age == pytest.approx(64.0, abs=0.01)
    assert meta.study_date == dt.date(2024, 1, 15) and meta.birth_date == dt.date(1960, 1, 15)
    assert meta.sex == "M" and meta.pixel_spacing == (0.15, 0.16) and meta.manufacturer == "ACME"
    assert meta.rows == 40 and meta.columns == 48 and meta.bits_stored == 12 and meta.is_frontal
    assert "TEST-0001" not in repr(meta)  # identifiers stay out of logs


@pytest.mark.parametrize(
    "tags,view",
    [
        ({"ViewPosition": "LL"}, "LAT"),
        ({"ViewPosition": "RL"}, "LAT"),
        ({"ViewPosition": "ap"}, "AP"),
        ({"ViewPosition": "", "SeriesDescription": "THORAX LATERAL"}, "LAT"),
        ({"ViewPosition": "", "SeriesDescription": "Chest PA"}, "PA"),
        ({"ViewPosition": "", "SeriesDescription": "CHEST PA + LAT"}, None),
        ({"ViewPosition": "", "PatientOrientation": ["A", "F"]}, "LAT"),
        ({"ViewPosition": "", "PatientOrientation": ["L", "F"], "ImageLaterality": "L"}, None),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case 'ap' on purpose
def test_view_fallbacks(write_dicom, tags, view):
    meta = bio.read_dicom_meta(write_dicom(anatomy(), **tags))
    assert meta.view == view
    assert meta.is_lateral == (view == "LAT")


def test_lateral_is_a_flag_not_an_error(write_dicom):
    img, meta = bio.read_image(write_dicom(anatomy(), ViewPosition="LATERAL"))
    assert meta.is_lateral and not meta.is_frontal and img.shape == (40, 48)


def test_dicom_without_preamble(tmp_path: Path, dicom_builder):
    from pydicom import dcmwrite

    ds = dicom_builder(anatomy())
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "bare"
    dcmwrite(path, ds, implicit_vr=False, little_endian=True)  # raw dataset: no preamble, no file meta
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM"
    img, meta = bio.read_image(path)
    np.testing.assert_array_equal(img, anatomy().astype(np.float32))
    assert meta.modality == "CR"


# --- errors ---------------------------------------------------------------------------


def test_wrong_modality(write_dicom):
    path = write_dicom(anatomy(), modality="CT")
    with pytest.raises(WrongModalityError) as ei:
        bio.read_image(path)
    assert ei.value.reason == "wrong_modality" and "CT" in str(ei.value)
    img, _ = bio.read_image(path, allowed_modalities=None)  # caller may opt out
    assert img.shape == (40, 48)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty_file"),
        (b"hello, this is a plain text file\n" * 10, "not_dicom"),
        (np.random.default_rng(1).bytes(4096), "not_dicom"),
    ],
)
def test_not_dicom(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(NotDicomError) as ei:
        bio.read_image(path)
    assert ei.value.reason == reason
    with pytest.raises(NotDicomError):
        bio.read_dicom_meta(path)


def test_png_is_not_dicom_for_read_dicom(tmp_path: Path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    with pytest.raises(NotDicomError):
        bio.read_dicom(path)


def test_truncated_pixel_data(write_dicom):
    path = write_dicom(anatomy())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(bio.TruncatedFileError) as ei:
        bio.read_image(path)
    assert ei.value.reason == "truncated"


@pytest.mark.parametrize("cut", [140, 200, 300, 450, 650])
def test_truncated_header(write_dicom, cut: int):
    path = write_dicom(anatomy())
    path.write_bytes(path.read_bytes()[:cut])  # file meta / dataset header cut short
    with pytest.raises(bio.TruncatedFileError):
        bio.read_image(path)
    with pytest.raises(bio.TruncatedFileError):
        bio.read_dicom_meta(path)


def test_truncated_inside_preamble(tmp_path: Path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(bio.TruncatedFileError):
        bio.read_image(path)


def test_multiframe(write_dicom):
    frames = np.stack([anatomy(), anatomy()])
    path = write_dicom(frames, NumberOfFrames=2)
    with pytest.raises(MultiFrameError):
        bio.read_image(path)


def test_no_pixel_data(write_dicom):
    import pydicom

    path = write_dicom(anatomy())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(NoPixelDataError):
        bio.read_image(path)
    assert bio.read_dicom_meta(path).modality == "CR"  # the header is still readable


def test_missing_required_tags(write_dicom):
    path = write_dicom(anatomy(), PatientID="", StudyDate="")
    img, _ = bio.read_image(path)  # not required: fine
    with pytest.raises(MissingTagError) as ei:
        bio.read_image(path, require=("PatientID", "StudyDate"))
    assert "PatientID" in str(ei.value) and "StudyDate" in str(ei.value)
    with pytest.raises(MissingTagError):
        bio.read_dicom_meta(path, require=("StudyDate",))


def test_unknown_transfer_syntax(write_dicom):
    import pydicom

    path = write_dicom(anatomy())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # private, no decoder anywhere
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MissingDecoderError) as ei:
        bio.read_image(path)
    assert ei.value.reason == "no_decoder" and "1.2.3.4.5.6.7" in str(ei.value)


def test_missing_decoder_names_the_package(pydicom_data_dir: Path, monkeypatch):
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    monkeypatch.setattr(JPEG2000LosslessDecoder, "_available", {})
    with pytest.raises(MissingDecoderError) as ei:
        bio.read_image(pydicom_data_dir / "RG1_J2KR.dcm")
    assert "pip install" in str(ei.value) and "pylibjpeg-openjpeg" in str(ei.value)
    assert "pylibjpeg-libjpeg" not in str(ei.value)  # never suggest the GPL decoder


def test_colour_dicom_is_unsupported(write_dicom):
    path = write_dicom(anatomy())
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(path)
    with pytest.raises(bio.UnsupportedImageError):
        bio.read_image(path)


# --- PNG / JPEG + sidecar ------------------------------------------------------------


def test_png16_with_sidecar(tmp_path: Path):
    arr = (anatomy().astype(np.uint32) * 16).astype(np.uint16)  # use the 16-bit range
    img_path = tmp_path / "imgs" / "a.png"
    img_path.parent.mkdir()
    Image.fromarray(arr).save(img_path)
    side = tmp_path / "meta.csv"
    side.write_text(
        "path,Patient ID,study_date,age,sex,view\n"
        "imgs/a.png,P1,2023-05-02,71,female,PA\n"
        "imgs/b.png,P2,2023-05-03,55,M,LL\n"
    )
    img, meta = bio.read_image(img_path, sidecar=side)
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert meta.source == "png" and meta.bits_stored == 16
    assert (meta.patient_id, meta.study_date, meta.age, meta.sex, meta.view) == (
        "P1", dt.date(2023, 5, 2), 71.0, "F", "PA",
    )
    loaded = bio.load_sidecar(side)
    assert bio.read_meta(tmp_path / "imgs" / "a.png", loaded).patient_id == "P1"
    with pytest.raises(MissingTagError):
        bio.read_image(img_path, sidecar={"path": "a.png"}, require=("PatientID",))


def test_png8_and_jpeg_by_content_not_extension(tmp_path: Path):
    arr = np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)
    png = tmp_path / "looks_like.dcm"
    Image.fromarray(arr).save(png, format="PNG")
    img, meta = bio.read_image(png)
    assert meta.source == "png" and meta.view is None
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    jpg = tmp_path / "x.jpg"
    Image.fromarray(arr).convert("RGB").save(jpg, quality=95)
    img, meta = bio.read_image(jpg, sidecar={"filename": "x.jpg", "view": "AP"})
    assert meta.source == "jpeg" and meta.view == "AP" and img.ndim == 2
    assert np.abs(img - arr).mean() < 3


def test_sidecar_by_filename_and_ambiguity(tmp_path: Path):
    side = tmp_path / "s.csv"
    side.write_text("Image Index,Patient Age,Patient Gender,View Position\nx.png,58,F,PA\ny.png,60,M,AP\ny.png,61,M,AP\n")
    s = bio.load_sidecar(side)
    row = s.lookup(tmp_path / "anywhere" / "x.png")
    assert row is not None and row["age"] == "58" and row["sex"] == "F"
    assert s.lookup(tmp_path / "y.png") is None  # two rows: refuse to guess


def test_truncated_png(tmp_path: Path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError) as ei:
        bio.read_image(path)
    assert ei.value.reason in ("truncated", "corrupt")


def test_iter_image_files(tmp_path: Path, write_dicom):
    write_dicom(anatomy(), "a/one.dcm")
    write_dicom(anatomy(), "a/b/IM0002")  # no extension, sniffed
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "meta.csv").write_text("path\n")
    (tmp_path / "a" / "junk").write_bytes(b"junk" * 50)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "c.png")
    (tmp_path / "a" / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / ".hidden" / "d.png")
    found = [p.relative_to(tmp_path).as_posix() for p in bio.iter_image_files(tmp_path / "a")]
    assert found == ["a/b/IM0002", "a/c.png", "a/one.dcm"]
    flat = [p.name for p in bio.iter_image_files([tmp_path / "a", tmp_path / "a" / "one.dcm"], recursive=False)]
    assert flat == ["c.png", "one.dcm"]


def test_no_tag_values_in_logs(write_dicom, caplog):
    import logging

    import pydicom

    path = write_dicom(anatomy())
    ds = pydicom.dcmread(path)
    with pytest.warns(UserWarning):  # invalid values: pydicom quotes some of them when reading
        ds.add_new("StudyID", "SH", "SECRET-PATIENT-NAME-WAY-TOO-LONG")
        ds.SeriesInstanceUID = "SECRET-NOT-A-UID"
    ds.save_as(path)
    with caplog.at_level(logging.DEBUG):
        img, _ = bio.read_image(path)
    assert img.shape == (40, 48)
    assert "SECRET" not in caplog.text
