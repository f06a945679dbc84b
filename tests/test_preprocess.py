"""bonescreen.preprocess: truncation math, resize, cache, batch runs and the CLI verb."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonescreen import preprocess as pp
from bonescreen.io import read_image

# --- truncation / resize ---------------------------------------------------------


def test_truncation_uses_central_region_and_clips_everything():
    img = np.full((8, 8), -100.0)
    img[0, :] = 1000.0  # a burnt-in marker outside the centre
    centre = np.linspace(10, 20, 16).reshape(4, 4)
    img[2:6, 2:6] = centre
    out = pp.grayscale_truncation(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[2:6, 2:6], (centre - 10) * 25.5, rtol=1e-6)
    assert out[0].tolist() == [255.0] * 8  # above the central max -> 255
    assert out[7, 0] == 0.0  # below the central min -> 0
    assert out.min() == 0.0 and out.max() == 255.0


def test_truncation_central_region_bounds_for_odd_sizes():
    img = np.zeros((7, 9))
    # H=7: rows 1..4 (7//4=1, 21//4=5); W=9: cols 2..5 (9//4=2, 27//4=6)
    img[1:5, 2:6] = np.arange(16).reshape(4, 4) + 1.0
    img[0, 0], img[6, 8] = -5.0, 99.0
    assert pp.central_range(img) == (1.0, 16.0)


def test_truncation_flat_centre_no_division_by_zero():
    img = np.full((16, 16), 7.0)
    img[0, 0] = 100.0
    with np.errstate(all="raise"):
        out = pp.grayscale_truncation(img)
    assert out.dtype == np.float32 and np.all(out == 0.0)


def test_truncation_is_invariant_to_positive_affine_maps():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(20, 24))
    np.testing.assert_allclose(pp.grayscale_truncation(img), pp.grayscale_truncation(3.0 * img + 7.0), atol=1e-3)


def test_truncation_rejects_non_2d():
    with pytest.raises(ValueError):
        pp.grayscale_truncation(np.zeros((2, 3, 4)))


def test_resize_area_average_when_shrinking_and_bilinear_when_growing():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    small = pp.resize(img, 2)
    expected = img.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(small, expected)
    big = pp.resize(small, (3, 5))
    assert big.shape == (3, 5) and big.dtype == np.float32
    assert expected.min() <= big.min() and big.max() <= expected.max()


def test_preprocess_array_shape_dtype_and_contrast():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1000, 200)[None, :] + np.zeros((300, 1))
    img = (ramp + rng.normal(0, 20, size=ramp.shape)).astype(np.float32)
    out = pp.preprocess_array(img, size=64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out[:, -1].min() == 255 and out[:, 0].max() == 0  # clipped outside the central range
    assert np.all(np.diff(out[32].astype(int)) >= 0)  # a ramp stays monotone


# --- cache -------------------------------------------------------------------------


@pytest.fixture
def small_dicom(write_dicom) -> Path:
    rng = np.random.default_rng(1)
    return write_dicom(rng.integers(0, 4095, size=(96, 80)), "cxr.dcm")


def test_cache_miss_then_hit(tmp_path: Path, small_dicom: Path, monkeypatch):
    calls = []
    real = pp.read_image

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(pp, "read_image", counting)
    cache = pp.PreprocessCache(tmp_path / "cache", size=32)
    assert small_dicom not in cache
    a = cache.get(small_dicom)
    assert len(calls) == 1 and small_dicom in cache
    png = cache.path_for(small_dicom)
    assert png.parent.parent == tmp_path / "cache" / "32" and png.parent.name == png.stem[:2]
    b = cache.get(small_dicom)
    assert len(calls) == 1  # read from the PNG, no decode
    np.testing.assert_array_equal(a, b)
    img, _ = read_image(small_dicom)
    np.testing.assert_array_equal(a, pp.preprocess_array(img, 32))
    # other size: other entry; a touched file: recomputed
    assert pp.PreprocessCache(tmp_path / "cache", size=16).get(small_dicom).shape == (16, 16)
    st = small_dicom.stat()
    os.utime(small_dicom, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert small_dicom not in cache
    cache.get(small_dicom)
    assert len(calls) == 3


def test_cache_write_is_atomic(tmp_path: Path, small_dicom: Path, monkeypatch):
    cache = pp.PreprocessCache(tmp_path / "cache", size=32)

    def dying_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.get(small_dicom)
    assert not cache.path_for(small_dicom).exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no temp file left


def test_cache_recovers_from_corrupt_entry(tmp_path: Path, small_dicom: Path):
    cache = pp.PreprocessCache(tmp_path / "cache", size=32)
    good = cache.get(small_dicom)
    cache.path_for(small_dicom).write_bytes(b"not a png")
    np.testing.assert_array_equal(cache.get(small_dicom), good)


# --- batch ----------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path: Path, write_dicom) -> Path:
    rng = np.random.default_rng(2)
    for i in range(3):
        write_dicom(rng.integers(0, 4095, size=(64, 64)), f"in/good{i}.dcm")
    Image.fromarray(rng.integers(0, 65535, size=(48, 40), dtype=np.uint16)).save(tmp_path / "in" / "good.png")
    write_dicom(rng.integers(0, 4095, size=(64, 64)), "in/ct.dcm", modality="CT")
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    (tmp_path / "in" / "notes.dcm").write_text("this is not an image\n" * 20)
    cut = tmp_path / "in" / "cut.dcm"
    write_dicom(rng.integers(0, 4095, size=(64, 64)), "in/cut.dcm")
    cut.write_bytes(cut.read_bytes()[:3000])
    return tmp_path / "in"


EXPECTED_SKIPS = {"ct.dcm": "wrong_modality", "empty.dcm": "empty_file", "notes.dcm": "not_dicom", "cut.dcm": "truncated"}


def _skips(csv_path: str) -> dict[str, str]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(set(r) == {"path", "reason", "message"} for r in rows)
    return {Path(r["path"]).name: r["reason"] for r in rows}


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_files_good_and_bad(tmp_path: Path, mixed_folder: Path, workers: int):
    from bonescreen.io import iter_image_files

    files = [str(p) for p in iter_image_files(mixed_folder)]
    res = pp.preprocess_files(files, tmp_path / "cache", size=32, workers=workers, progress=False)
    assert (res.n_total, res.n_computed, res.n_cached, res.n_skipped) == (8, 4, 0, 4)
    assert _skips(res.skip_list) == EXPECTED_SKIPS
    assert res.skip_list == str(tmp_path / "cache" / "32" / "skipped.csv")
    good = sorted(res.outputs)
    assert [Path(g).name for g in good] == ["good.png", "good0.dcm", "good1.dcm", "good2.dcm"]
    for g in good:
        stored = np.asarray(Image.open(res.outputs[g]))
        np.testing.assert_array_equal(stored, pp.preprocess_array(read_image(g)[0], 32))
    # resumable: a second run decodes nothing new
    again = pp.preprocess_files(files, tmp_path / "cache", size=32, workers=workers, progress=False)
    assert (again.n_computed, again.n_cached, again.n_skipped) == (0, 4, 4)
    assert "4 skipped" in again.summary() and "wrong_modality=1" in again.summary()


# Run in a fresh interpreter: it has no threads (torch, tqdm's monitor) when it forks, so the
# patched worker reaches the children without the fork-with-threads deadlocks that a fork from
# a pytest worker that already imported torch can hit.
_CRASH_SCRIPT = """
import json, os, sys
import bonescreen.preprocess as pp
real = pp._process_one
def crash_on_good1(path, *args):
    if path.endswith("good1.dcm"):
        os._exit(3)
    return real(path, *args)
if __name__ == "__main__":
    import multiprocessing
    pp._mp_context = lambda: multiprocessing.get_context("fork")
    pp._process_one = crash_on_good1
    files = sorted(str(p) for p in __import__("pathlib").Path(sys.argv[1]).iterdir())
    res = pp.preprocess_files(files, sys.argv[2], size=32, workers=2, progress=False)
    print(json.dumps({"skip_list": res.skip_list, "n_ok": res.n_ok}))
"""


@pytest.mark.skipif(os.name != "posix", reason="relies on fork inheriting the patched worker")
def test_worker_crash_is_isolated(tmp_path: Path, mixed_folder: Path):
    import json
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(mixed_folder), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    skips = _skips(res["skip_list"])
    assert skips.pop("good1.dcm") == "worker_crashed"
    assert skips == EXPECTED_SKIPS
    assert res["n_ok"] == 3  # a file finished just before the crash may count as cached on retry


def test_missing_file_is_recorded(tmp_path: Path):
    res = pp.preprocess_files([str(tmp_path / "nope.dcm")], tmp_path / "c", size=16, workers=1, progress=False)
    assert res.n_skipped == 1 and res.skipped[0].reason == "not_found"


# --- CLI ------------------------------------------------------------------------------------


def test_cli_folder_and_manifest(tmp_path: Path, mixed_folder: Path, capsys):
    from bonescreen.cli import main

    rc = main(["preprocess", str(mixed_folder), "--cache", str(tmp_path / "c"), "--size", "24", "--workers", "1",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "8 files: 4 preprocessed, 0 already cached, 4 skipped" in out
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image_id,path\na,in/good0.dcm\nb,in/ct.dcm\n")  # relative to the manifest
    skip = tmp_path / "skips.csv"
    rc = main(["preprocess", "--manifest", str(manifest), "--cache", str(tmp_path / "c"), "--size", "24",
               "--workers", "1", "--no-progress", "--skip-list", str(skip)])
    assert rc == 0
    assert "2 files: 0 preprocessed, 1 already cached, 1 skipped" in capsys.readouterr().out
    assert _skips(str(skip)) == {"ct.dcm": "wrong_modality"}
