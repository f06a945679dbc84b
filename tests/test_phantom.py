"""Phantom cohort: determinism, DICOM validity, label signal in the bones, DXA exports."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from bonescreen.labels import who_category
from bonescreen.phantom import (
    MESSY_DEFECTS,
    PatientRecord,
    PhantomError,
    SiteSpec,
    VendorProfile,
    default_sites,
    far_site,
    far_vendor,
    generate_phantom,
    render_patient_image,
)
from bonescreen.phantom.adult import build_site, stage2_prevalence

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _pixels(path: Path) -> np.ndarray:
    """Bone-bright float pixels: modality LUT, MONOCHROME1 inverted about the stored range."""
    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = int(ds.BitsStored)
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ds.PixelRepresentation else (0, (1 << bits) - 1)
        slope, icpt = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        arr = (lo * slope + icpt) + (hi * slope + icpt) - arr
    return arr


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "ph"
    generate_phantom(out, n_per_site=24, pool_size=6, size=64, seed=3, progress=False)
    return out


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers_other_seed_differs(tmp_path: Path) -> None:
    sites = [s for s in default_sites() if s.name in ("DEV", "EXT_C")]
    kw: dict = {"sites": sites, "n_per_site": 10, "pool_size": 3, "size": 48, "progress": False}
    generate_phantom(tmp_path / "a", seed=11, workers=1, **kw)
    generate_phantom(tmp_path / "b", seed=11, workers=2, **kw)
    generate_phantom(tmp_path / "c", seed=12, workers=1, **kw)
    a, b, c = _all_files(tmp_path / "a"), _all_files(tmp_path / "b"), _all_files(tmp_path / "c")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    shared = sorted(set(a) & set(c) & {k for k in a if k.endswith(".dcm")})
    assert shared, "the two seeds should share some file names"
    for k in shared:
        da, dc = pydicom.dcmread(tmp_path / "a" / k), pydicom.dcmread(tmp_path / "c" / k)
        assert da.SOPInstanceUID != dc.SOPInstanceUID
        assert not np.array_equal(da.pixel_array, dc.pixel_array)
    # regenerating into an existing phantom folder replaces it
    generate_phantom(tmp_path / "a", seed=11, workers=1, **kw)
    assert _all_files(tmp_path / "a") == a


def test_dicoms_carry_required_tags(cohort: Path) -> None:
    images = _rows(cohort / "truth_images.csv")
    assert images
    seen_ts, seen_photo, seen_views, sops = set(), set(), set(), set()
    for row in images:
        ds = pydicom.dcmread(cohort / row["path"])
        assert ds.SOPClassUID in (CR, DX)
        assert ds.Modality == ("CR" if ds.SOPClassUID == CR else "DX")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientID == row["patient_id"]
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert ds.PatientSex in ("F", "M")
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate)
        assert re.fullmatch(r"\d{3}Y", ds.PatientAge)
        assert ds.StudyDate == row["study_date"].replace("-", "")
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "Manufacturer", "PixelSpacing", "ImagerPixelSpacing"):
            assert ds.get(kw), kw
        assert ds.BodyPartExamined == "CHEST"
        assert ds.BitsAllocated == 16 and 10 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation in (0, 1)
        assert ds.pixel_array.shape == (64, 64)
        view = ds.ViewPosition or ""
        if view:
            assert view in ("PA", "AP", "LL", "LAT", "LATERAL")
            assert (view in ("LL", "LAT", "LATERAL")) == (row["view"] == "LAT")
        else:
            assert row["view"] in ds.SeriesDescription  # vendor that names the view only there
        seen_ts.add(str(ds.file_meta.TransferSyntaxUID))
        seen_photo.add(ds.PhotometricInterpretation)
        seen_views.add(row["view"])
        sops.add(ds.SOPInstanceUID)
    assert len(sops) == len(images)
    assert {RLE, J2K_LOSSLESS} <= seen_ts
    assert seen_photo == {"MONOCHROME1", "MONOCHROME2"}
    assert {"PA", "LAT"} <= seen_views


def test_project_reader_sees_bone_bright(cohort: Path) -> None:
    """bonescreen.io reads every vendor; the spine is brighter than the lung fields."""
    from bonescreen.io import read_image

    rows = [r for r in _rows(cohort / "truth_images.csv") if r["view"] == "PA"]
    brighter = []
    for r in rows:
        img, meta = read_image(cohort / r["path"])
        h, w = img.shape
        spine = img[int(0.25 * h) : int(0.5 * h), int(0.47 * w) : int(0.53 * w)].mean()
        lung = img[int(0.3 * h) : int(0.5 * h), int(0.22 * w) : int(0.32 * w)].mean()
        brighter.append(spine > lung)
        assert meta.patient_id == r["patient_id"]
    assert np.mean(brighter) > 0.95


@pytest.fixture(scope="module")
def dev_signal(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """First frontal radiograph of 180 DEV patients at 128 px, read back from DICOM."""
    out = tmp_path_factory.mktemp("signal") / "ph"
    dev = [dataclasses.replace(s, messy=False) for s in default_sites() if s.name == "DEV"]
    generate_phantom(out, sites=dev, n_per_site=180, pool_size=0, size=128, seed=5, progress=False)
    label = {r["patient_id"]: r["label"] for r in _rows(out / "truth.csv")}
    y, feats = [], {"spine_mean": [], "spine_structure": [], "rib_structure": [], "global_mean": []}
    for r in _rows(out / "truth_images.csv"):
        if r["k"] != "0" or r["view"] == "LAT" or label[r["patient_id"]] == "":
            continue
        a = _pixels(out / r["path"])
        a = a / a.max()
        h, w = a.shape
        spine = a[int(0.25 * h) : int(0.7 * h), int(0.47 * w) : int(0.53 * w)]
        detail = np.abs(a - ndimage.gaussian_filter(a, 2.0))
        lungs = np.concatenate(
            [
                detail[int(0.25 * h) : int(0.55 * h), int(0.2 * w) : int(0.38 * w)].ravel(),
                detail[int(0.25 * h) : int(0.55 * h), int(0.62 * w) : int(0.8 * w)].ravel(),
            ]
        )
        feats["spine_mean"].append(spine.mean())
        feats["spine_structure"].append(spine.std())
        feats["rib_structure"].append(lungs.mean())
        feats["global_mean"].append(a.mean())
        y.append(int(label[r["patient_id"]]))
    return np.array(y), {k: np.array(v) for k, v in feats.items()}


def test_label_lives_in_the_bones_not_in_global_brightness(
    dev_signal: tuple[np.ndarray, dict[str, np.ndarray]],
) -> None:
    """Low bone mass = fainter, less structured bones; the whole-image mean does not tell.

    The spine-region *mean* is partly masked by body habitus (heavier patients
    have denser bones but lower relative bone contrast), so it separates less
    than bone structure (spine texture, rib edges in the lung fields) does; the
    causal effect on bone pixels is checked on counterfactual renders below.
    """
    y, f = dev_signal
    assert 120 <= y.size and 0.2 < y.mean() < 0.6
    auc = {k: roc_auc_score(y, -v) for k, v in f.items()}  # low bone mass = lower values
    assert auc["spine_mean"] > 0.58, auc
    assert auc["spine_structure"] > 0.65, auc
    assert auc["rib_structure"] > 0.65, auc
    assert abs(auc["global_mean"] - 0.5) < 0.1, auc


def test_density_changes_bones_only() -> None:
    """Same patient and exposure, lower latent: bone pixels dim, the rest stays put.

    No global brightness or exposure change rides along with density. With
    the vendor's multi-scale processing a bone change leaks a little into its
    surroundings (unsharp-mask halo); without processing it does not at all.
    """
    base = PatientRecord("DEV-00001", "DEV", 1, "F", 58.0, 160.0, 62.0, 0.5)
    plain = VendorProfile(detail_gain=1.0, range_compression=1.0, scatter=0.0)
    for vendor, leak in ((VendorProfile(), 0.2), (plain, 0.02)):
        for k in range(3):
            hi = render_patient_image(base, vendor=vendor, size=128, k=k)
            lo = render_patient_image(dataclasses.replace(base, latent=-2.0), vendor=vendor, size=128, k=k)
            assert np.array_equal(hi.bone_mask, lo.bone_mask)
            diff = hi.display - lo.display
            on_bone = diff[hi.bone_mask].mean()
            assert on_bone > 0.02
            off_bone = np.abs(diff[~ndimage.binary_dilation(hi.bone_mask, iterations=2)]).mean()
            assert off_bone < leak * on_bone, (vendor.detail_gain, off_bone, on_bone)
            spine = (slice(32, 90), slice(60, 68))
            assert diff[spine].mean() > 0.02


def test_render_is_pure_and_views_differ() -> None:
    p = PatientRecord("EXT_B-00007", "EXT_B", 7, "M", 70.0, 172.0, 80.0, -1.0, device=True)
    a = render_patient_image(p, size=96, seed=1, k=0)
    b = render_patient_image(p, size=96, seed=1, k=0)
    assert np.array_equal(a.stored, b.stored) and a.stored.shape == (96, 96)
    lat = render_patient_image(p, view="LAT", size=96, seed=1, k=0)
    assert np.corrcoef(a.attenuation.ravel(), lat.attenuation.ravel())[0, 1] < 0.9
    no_device = render_patient_image(dataclasses.replace(p, device=False), size=96, seed=1, k=0)
    assert (a.attenuation - no_device.attenuation).max() > 1.5  # metal can and lead
    with pytest.raises(PhantomError):
        render_patient_image(p, view="OBLIQUE", size=96)


def test_category_only_site_has_no_t_scores(cohort: Path) -> None:
    rows = _rows(cohort / "EXT_C" / "dxa.csv")
    assert rows
    assert not any(c.startswith(("t_", "z_", "bmd_")) for c in rows[0])
    assert {r["category"] for r in rows} <= {"normal", "low_bone_mass", "osteoporosis"}
    t_rows = _rows(cohort / "DEV" / "dxa.csv")
    assert {"t_lumbar_spine", "t_femoral_neck", "t_total_hip", "z_total_hip", "bmd_femoral_neck"} <= set(t_rows[0])


def test_messy_dev_export(cohort: Path) -> None:
    rows = _rows(cohort / "DEV" / "dxa.csv")
    images = _rows(cohort / "truth_images.csv")
    with_images = {r["patient_id"] for r in images if r["site"] == "DEV"}
    in_dxa = {r["patient_id"] for r in rows}
    keys = [tuple(r.values()) for r in rows]
    assert len(keys) > len(set(keys)), "duplicated row"
    assert any(r["t_femoral_neck"] == "see report" for r in rows)
    assert any(r["t_lumbar_spine"] == "15.0" for r in rows)
    assert any(re.fullmatch(r"\d{2}/\d{2}/\d{4}", r["exam_date"]) for r in rows)
    assert in_dxa - with_images, "a DXA patient without CXR"
    assert with_images - in_dxa, "a CXR patient without DXA"
    defects = json.loads((cohort / "phantom.json").read_text())["defects"]
    assert sorted(d["defect"] for d in defects) == sorted(MESSY_DEFECTS)
    # other sites are clean
    ext = _rows(cohort / "EXT_A" / "dxa.csv")
    assert len({r["patient_id"] for r in ext}) == len(ext)


def test_truth_matches_exports_and_pairing_windows(cohort: Path) -> None:
    truth = {r["patient_id"]: r for r in _rows(cohort / "truth.csv")}
    for r in _rows(cohort / "EXT_A" / "dxa.csv"):
        t = truth[r["patient_id"]]
        ts = [float(r[c]) for c in ("t_lumbar_spine", "t_femoral_neck", "t_total_hip")]
        assert [float(t[c]) for c in ("t_lumbar_spine", "t_femoral_neck", "t_total_hip")] == ts
        assert who_category(min(ts)) == t["category"] == r["category"]
        assert r["exam_date"] == t["dxa_date"]
    images = _rows(cohort / "truth_images.csv")
    days = [abs(int(r["days_from_dxa"])) for r in images if r["site"] != "pool"]
    assert min(days) == 0 and max(days) > 180
    pids = {r["patient_id"] for r in images if r["view"] in ("PA", "AP")}
    assert all(r["patient_id"] in pids for r in images if r["view"] == "LAT"), "laterals come with a frontal"
    pool = [r for r in images if r["site"] == "pool"]
    assert len(pool) == 6 and all(r["days_from_dxa"] == "" for r in pool)
    assert not (cohort / "pool" / "dxa.csv").exists()


def test_oracle_and_prevalence(cohort: Path) -> None:
    oracle = json.loads((cohort / "oracle.json").read_text())
    assert set(oracle) == {"DEV", "EXT_A", "EXT_B", "EXT_C", "FAR"}
    for name, o in oracle.items():
        assert o["n"] == o["n_normal"] + o["n_low_bone_mass"]
        assert o["prevalence"] == pytest.approx(o["n_low_bone_mass"] / o["n"], abs=1e-4)
        assert 0.5 < o["auc"] < 1.0, (name, o)
    # on a large sample (no images): prevalence in 25-50 %, osteoporosis present,
    # and the ceiling clearly below 1 because DXA sites and noise differ from the latent
    for spec in default_sites():
        built = build_site(spec, spec.name, 8000, 0)
        cat = built["category"]
        assert 0.25 <= stage2_prevalence(cat) <= 0.5, spec.name
        assert abs(stage2_prevalence(cat) - spec.prevalence) < 0.03, spec.name
        assert (cat == "osteoporosis").mean() > 0.02
        keep = cat != "osteoporosis"
        auc = roc_auc_score(cat[keep] == "low_bone_mass", -built["latent"][keep])
        assert 0.8 < auc < 0.99, (spec.name, auc)


def test_cli_prints_sites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import main

    out = tmp_path / "cli"
    args = ["phantom", str(out), "--n-per-site", "8", "--pool", "2", "--size", "48", "--sites", "DEV,EXT_C", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "oracle AUC" in text and "EXT_C" in text and "EXT_A" not in text
    assert (out / "DEV" / "dxa.csv").is_file() and (out / "pool" / "images").is_dir()
    assert main(["phantom", str(out), "--sites", "NOPE", "--quiet"]) == 1


def test_far_site_differs_from_dev_on_every_axis_and_keeps_the_others() -> None:
    """FAR's system differs from DEV's in encoding, response, processing, dose and geometry."""
    dev = next(s for s in default_sites() if s.name == "DEV").vendors[0]
    far = far_vendor()
    assert far_site() in default_sites()
    differ = ("modality", "bits_stored", "photometric", "response", "exposure", "electronic_noise",
              "scatter", "blur_mm", "detail_gain", "range_compression", "fov_mm", "collimation",
              "collimation_fill", "marker", "voi_window", "rescale", "annotation")
    assert [k for k in differ if getattr(dev, k) == getattr(far, k)] == []
    # a different population too: older, more women, more inpatient (AP) views, higher prevalence
    spec, dspec = far_site(), next(s for s in default_sites() if s.name == "DEV")
    assert spec.age_mean > dspec.age_mean + 15 and spec.female_frac > dspec.female_frac
    assert spec.prevalence > dspec.prevalence and spec.ap_frac > 10 * dspec.ap_frac


def test_adding_far_leaves_other_sites_byte_identical(tmp_path: Path) -> None:
    dev = [s for s in default_sites() if s.name == "DEV"]
    kw: dict = {"n_per_site": 6, "pool_size": 2, "size": 48, "seed": 4, "progress": False}
    generate_phantom(tmp_path / "a", sites=dev, **kw)
    generate_phantom(tmp_path / "b", sites=[*dev, far_site()], **kw)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    shared = [k for k in a if k.endswith((".dcm", "dxa.csv"))]
    assert shared and all(a[k] == b[k] for k in shared)
    assert any(k.startswith("FAR/images/") for k in b)


def test_far_burned_in_text_is_independent_of_density_and_off_centre() -> None:
    """The text line is burned in white near the bottom edge, the same whatever the bone density,
    and never inside the central region whose min/max set the grayscale truncation."""
    base = PatientRecord("FAR-00003", "FAR", 3, "F", 80.0, 155.0, 58.0, 0.5)
    plain = dataclasses.replace(far_vendor(), annotation=None)
    for k in range(3):
        inks = []
        for latent in (0.5, -2.5):
            p = dataclasses.replace(base, latent=latent)
            hi = render_patient_image(p, vendor=far_vendor(), size=256, k=k)
            bare = render_patient_image(p, vendor=plain, size=256, k=k)
            inks.append((hi.display == 1.0) & (bare.display < 1.0))
        ink = inks[0]
        assert ink.sum() > 30  # the text is there
        assert np.array_equal(inks[0], inks[1])
        rows, _ = np.nonzero(ink)
        assert rows.min() > 0.75 * 256  # below the central region (rows 64..191)
        assert np.array_equal(hi.display[64:192, 64:192], bare.display[64:192, 64:192])


def test_bad_requests_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PhantomError, match="not empty"):
        generate_phantom(tmp_path, n_per_site=2, pool_size=0, size=48, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(PhantomError, match="pediatric"):
        generate_phantom(tmp_path / "x", sites=[SiteSpec(name="KIDS", pediatric=True)], size=48, progress=False)
    with pytest.raises(PhantomError):
        SiteSpec(name="bad/name")
    with pytest.raises(PhantomError):
        SiteSpec(name="S", label_type="z_score")
    with pytest.raises(ValueError):
        VendorProfile(bits_stored=8)
    with pytest.raises(ValueError):
        VendorProfile(photometric="RGB")


def test_one_generator_plans_adult_and_pediatric_sites_alike(tmp_path: Path) -> None:
    """Both planners return a SitePlan; one phantom holds both populations and each site's
    files are the same as when it is generated alone."""
    from bonescreen.phantom import SitePlan
    from bonescreen.phantom.generate import plan_site
    from bonescreen.phantom.pediatric import default_pediatric_sites

    dev = dataclasses.replace(default_sites()[0], messy=False)
    ped = default_pediatric_sites()[0]
    for spec, population, label_type in ((dev, "adult", "t_score"), (ped, "pediatric", "z_score")):
        plan = plan_site(spec, 5, tmp_path / "plan", 32, 0)
        assert isinstance(plan, SitePlan) and plan.population == population and plan.spec == spec
        assert len(plan.truth) == len(plan.patients) == len(plan.dxa.rows) == 5
        assert plan.summary["label_type"] == label_type and plan.summary["n_images"] == len(plan.jobs)
        assert sum(int(r["n_images"]) for r in plan.truth) == len(plan.jobs) > 0
        assert (plan.extra_truth is not None) == (population == "pediatric")
    assert not (tmp_path / "plan").exists(), "planning writes no files"

    kw: dict = {"n_per_site": 5, "pool_size": 2, "size": 32, "seed": 1, "progress": False}
    generate_phantom(tmp_path / "both", sites=[dev, ped], **kw)
    generate_phantom(tmp_path / "ped", sites=[ped], **kw)
    both, alone = _all_files(tmp_path / "both"), _all_files(tmp_path / "ped")
    ped_files = [k for k in alone if k.startswith("PED/")]
    assert ped_files and all(both[k] == alone[k] for k in ped_files)
    truth = _rows(tmp_path / "both" / "truth.csv")
    assert {r["label_type"] for r in truth} == {"t_score", "z_score", "hidden"}
    assert {r["site"] for r in _rows(tmp_path / "both" / "truth_pediatric.csv")} == {"PED"}
    config = json.loads((tmp_path / "both" / "phantom.json").read_text())
    assert "pediatric" in config["model"] and "latent_sd" in config["model"]
    assert config["summary"]["PED"]["burden_effect"] and config["summary"]["DEV"]["intercept"] is not None
    assert set(json.loads((tmp_path / "both" / "oracle.json").read_text())) == {"DEV", "PED"}
