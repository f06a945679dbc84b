"""The C-STORE receiver against a real DICOM peer (pynetdicom as the sending SCU).

Reliability: 200 images from 4 concurrent senders each get exactly one
result; malformed objects are refused with a failure status and the service
keeps receiving; unknown calling AE titles are rejected.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pynetdicom = pytest.importorskip("pynetdicom")

from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service
from _service_support import free_port, make_cxr_dataset, make_tiny_artifact

CR = "1.2.840.10008.5.1.4.1.1.1"
SENDER = "CXR_MODALITY"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny.pt", size=32, min_size=32)


@pytest.fixture()
def service(artifact: Path, tmp_path: Path) -> Iterator[Service]:
    cfg = ServiceConfig(model=str(artifact), data_dir=str(tmp_path / "data"), dicom_port=free_port(),
                        dicom_host="127.0.0.1", allowed_aes=[SENDER, "SECOND"], explain=False, write_sr=False,
                        batch_size=16, poll_seconds=0.05).validate()
    svc = Service(cfg, token="t")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def _assoc(port: int, calling: str = SENDER) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    # Explicit VR only: the raw (not re-encoded) malformed file below is in that syntax
    ae.add_requested_context(CR, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="BONESCREEN")


def _wait_done(svc: Service, n: int, timeout: float = 90.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if svc.store.pending_count() == 0 and len(svc.store.all_result_sops()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {len(svc.store.all_result_sops())} of {n} results after {timeout} s")


def test_200_images_from_4_concurrent_senders_each_get_one_result(service: Service) -> None:
    n_senders, per_sender = 4, 50
    datasets = [[make_cxr_dataset(seed=s * 1000 + i, size=64, patient_id=f"P{s}{i:03d}")
                 for i in range(per_sender)] for s in range(n_senders)]
    statuses: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def send(batch: list[Any], calling: str) -> None:
        assoc = _assoc(service.scp.port, calling)  # type: ignore[union-attr]
        if not assoc.is_established:
            errors.append("association not established")
            return
        try:
            for ds in batch:
                st = assoc.send_c_store(ds)
                with lock:
                    statuses.append(int(st.Status) if "Status" in st else -1)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(datasets[s], SENDER if s % 2 else "SECOND"))
               for s in range(n_senders)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    received_s = time.time() - t0
    assert not errors
    assert statuses == [0] * (n_senders * per_sender)
    _wait_done(service, n_senders * per_sender)
    sent = {str(ds.SOPInstanceUID) for batch in datasets for ds in batch}
    results = service.store.all_result_sops()
    assert Counter(results) == Counter(sent)  # every image exactly one result, nothing extra
    rows = service.store.query_results(limit=1000)
    assert all(r.eligible and r.category in ("normal", "low_bone_mass") for r in rows)
    assert service.store.counts()["jobs"] == {"done": 200}
    print(f"200 images received in {received_s:.1f} s, all screened in {time.time() - t0:.1f} s")


def test_resend_is_idempotent(service: Service) -> None:
    ds = make_cxr_dataset(seed=5)
    assoc = _assoc(service.scp.port)  # type: ignore[union-attr]
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
        _wait_done(service, 1)
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    time.sleep(0.5)
    assert service.store.all_result_sops() == [str(ds.SOPInstanceUID)]


def test_unknown_calling_ae_rejected(service: Service) -> None:
    assoc = _assoc(service.scp.port, calling="INTRUDER")  # type: ignore[union-attr]
    assert assoc.is_rejected
    assert not assoc.is_established


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the deliberately broken UID
def test_malformed_objects_refused_and_service_stays_up(service: Service, tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import _config

    assoc = _assoc(service.scp.port)  # type: ignore[union-attr]
    assert assoc.is_established
    try:
        # no pixel data
        ds = make_cxr_dataset(seed=1)
        del ds.PixelData
        st = assoc.send_c_store(ds)
        assert 0xA900 <= int(st.Status) <= 0xCFFF
        # pixel data shorter than Rows x Columns says
        ds = make_cxr_dataset(seed=2)
        ds.PixelData = ds.PixelData[:100]
        st = assoc.send_c_store(ds)
        assert 0xA900 <= int(st.Status) <= 0xCFFF
        # garbage bytes after a valid file meta, sent raw (no re-encoding by the SCU)
        good = make_cxr_dataset(seed=3)
        meta_path = tmp_path / "bad.dcm"
        good.save_as(meta_path, enforce_file_format=True)
        raw = meta_path.read_bytes()
        head = good.file_meta
        assert head.TransferSyntaxUID == ExplicitVRLittleEndian
        cut = raw.index(b"\x08\x00")  # first non-meta element (group 0x0008) after the meta group
        while raw[cut:cut + 2] != b"\x08\x00" or cut < 132:
            cut = raw.index(b"\x08\x00", cut + 1)
        meta_path.write_bytes(raw[:cut] + b"\x08\x00\x18\x00UI\xff\x00" + b"1.2.3\x00" + b"\xde\xad" * 40)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            st = assoc.send_c_store(meta_path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert "Status" in st and 0xA900 <= int(st.Status) <= 0xCFFF
        # the association and the service are still fine
        assert assoc.send_c_echo().Status == 0
        good = make_cxr_dataset(seed=4)
        assert assoc.send_c_store(good).Status == 0
    finally:
        assoc.release()
    _wait_done(service, 1)
    assert service.store.all_result_sops() == [str(good.SOPInstanceUID)]
    assert service.scp is not None and service.scp.refused == 3
    assert service.health()["status"] == "ok"


def test_config_requires_calling_aes(artifact: Path, tmp_path: Path) -> None:
    from bonescreen.service.config import ServiceConfigError

    with pytest.raises(ServiceConfigError, match="calling AE"):
        ServiceConfig(model=str(artifact), data_dir=str(tmp_path)).validate()
    ServiceConfig(model=str(artifact), data_dir=str(tmp_path), allow_any_ae=True).validate()
