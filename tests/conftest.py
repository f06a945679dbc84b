"""Shared test fixtures: the real CR chest radiograph from ``pydicom-data`` and a tiny DICOM builder."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def _pydicom_data_dir() -> Path | None:
    # Located through the installed package, never pydicom.data.get_testdata_file
    # (which would try the network for files not installed).
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "data"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def pydicom_data_dir() -> Path:
    """Folder holding ``RG1_UNCR.dcm`` / ``RG1_J2KR.dcm`` (real CR chest, MONOCHROME1)."""
    d = _pydicom_data_dir()
    if d is None or not (d / "RG1_UNCR.dcm").is_file():
        pytest.fail("the test extra 'pydicom-data' is not installed (pip install pydicom-data)")
    return d


def build_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "CR",
    signed: bool = False,
    **tags: Any,
) -> Any:
    """A minimal single-frame DICOM ``FileDataset`` (Explicit VR Little Endian) around ``pixels``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "TEST-0001"
    ds.StudyDate = "20240115"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.ViewPosition = "PA"
    arr = np.asarray(pixels)
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture
def dicom_builder() -> Callable[..., Any]:
    """:func:`build_dicom`, for tests that need the dataset before writing it."""
    return build_dicom


@pytest.fixture
def write_dicom(tmp_path: Path) -> Callable[..., Path]:
    """``write_dicom(pixels, name="x.dcm", **build_dicom_kwargs) -> Path``."""

    def _write(pixels: np.ndarray, name: str = "image.dcm", **kwargs: Any) -> Path:
        ds = build_dicom(pixels, **kwargs)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    return _write


# CI installs every system package the tests drive (Chromium, PostgreSQL, Orthanc) and every
# test extra. There, a skip can only mean a broken install step, so .ci/run sets
# BONESCREEN_NO_SKIPS=1 and any skip becomes a failure instead of a quiet pass.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("BONESCREEN_NO_SKIPS") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be skipped: {reason}"


@pytest.fixture(autouse=True, scope="session")
def _pseudonym_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Screening pseudonymises patient ids with a per-user key: keep it out of the real home."""
    key = tmp_path_factory.mktemp("pseudonym") / "pseudonym.key"
    os.environ["BONESCREEN_PSEUDONYM_KEY_FILE"] = str(key)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """One throwaway PostgreSQL server per test process (Debian's postgresql), shared by the service tests."""
    from _service_support import find_pg_bin, postgres_cluster

    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (v3) not installed: pip install 'psycopg[binary]'")
    with postgres_cluster() as pg:
        yield pg.url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind the service supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bonescreen.db'}"
    from _service_support import reset_database

    url = str(request.getfixturevalue("pg_server_url"))
    reset_database(url)
    return url
