"""Results back to PACS: C-STORE and STOW-RS, against Orthanc (Debian's PACS) or small stand-in peers."""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from bonescreen.service.config import ServiceConfig
from bonescreen.service.forward import CStoreSender, ForwardLoop
from bonescreen.service.runtime import Service
from _service_support import (
    find_orthanc,
    free_port,
    make_cxr_bytes,
    make_tiny_artifact,
    orthanc_server,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny.pt", size=64, min_size=32)


def _service(artifact: Path, data: Path, **kw: Any) -> Service:
    cfg = ServiceConfig(model=str(artifact), data_dir=str(data), poll_seconds=0.05, **kw).validate()
    svc = Service(cfg, token="t")
    svc.forwarder.poll_s = 0.1
    svc.forwarder.backoff_s = 0.2
    return svc


def _wait_forwarded(svc: Service, n: int, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        fw = svc.store.counts()["forward"]
        if fw.get("done", 0) >= n:
            return
        assert not fw.get("failed"), fw
        time.sleep(0.1)
    raise AssertionError(f"not forwarded: {svc.store.counts()}")


# ------------------------------------------------------------- stand-in peers


class _StorePeer:
    """A pynetdicom Storage SCP that keeps what it receives (SOP class, instance, patient)."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.got: list[tuple[str, str, str]] = []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()

        def on_store(event: Any) -> int:
            ds = event.dataset
            self.got.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("PatientID", ""))))
            return 0

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self) -> None:
        self.server.shutdown()


class _StowPeer(http.server.ThreadingHTTPServer):
    """A minimal STOW-RS endpoint: parses multipart/related and keeps each DICOM part."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.paths: list[str] = []
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                peer.paths.append(self.path)
                peer.parts += [p.get_payload(decode=True) for p in msg.iter_parts()
                               if p.get_content_type() == "application/dicom"]
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicomweb"


def test_forward_sr_and_overlay_by_cstore_and_stow(artifact: Path, tmp_path: Path) -> None:
    import io

    import pydicom

    pacs, stow = _StorePeer(), _StowPeer()
    svc = _service(artifact, tmp_path / "data", dicom_enabled=False,
                   forward_cstore=f"PACS@127.0.0.1:{pacs.port}", forward_stow_url=stow.url)
    svc.start()
    try:
        res = svc.intake.accept_file_bytes(make_cxr_bytes(seed=9, patient_id="FWD1"), "http")
        svc.notify()
        _wait_forwarded(svc, 1)
    finally:
        svc.stop()
        pacs.close()
        stow.shutdown()
    classes = sorted(c for c, _, _ in pacs.got)
    assert classes == sorted([SR_CLASS, SC_CLASS])
    assert {p for _, _, p in pacs.got} == {"FWD1"}
    assert stow.paths == ["/dicomweb/studies"]
    stowed = [pydicom.dcmread(io.BytesIO(b)) for b in stow.parts]
    assert sorted(str(d.SOPClassUID) for d in stowed) == sorted([SR_CLASS, SC_CLASS])
    sr = next(d for d in stowed if d.SOPClassUID == SR_CLASS)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ev.ReferencedSOPInstanceUID == res.sop_instance_uid


def test_unreachable_pacs_retries_then_gives_up(artifact: Path, tmp_path: Path) -> None:
    svc = _service(artifact, tmp_path / "data", dicom_enabled=False, forward_cstore=f"PACS@127.0.0.1:{free_port()}",
                   forward_max_attempts=2, explain=False)
    assert svc.worker is not None
    svc.worker.start()  # worker only; the forward loop is driven by hand below
    try:
        svc.intake.accept_file_bytes(make_cxr_bytes(seed=4), "http")
        svc.notify()
        t0 = time.time()
        while svc.store.counts()["forward"].get("pending", 0) < 1:
            assert time.time() - t0 < 30
            time.sleep(0.05)
        loop = ForwardLoop(svc.config, svc.store, [CStoreSender(svc.config.forward_cstore or "", timeout=2)],
                           backoff_s=0.0)
        assert loop.run_once() == 1 and loop.failed == 1
        assert svc.store.counts()["forward"] == {"pending": 1}
        assert loop.run_once() == 1
        assert svc.store.counts()["forward"] == {"dead_letter": 1}
        assert loop.run_once() == 0  # given up; nothing due
        assert svc.health()["status"] == "ok"
    finally:
        svc.stop()


# -------------------------------------------------------------------- Orthanc


@pytest.fixture(scope="module")
def orthanc_and_port() -> Iterator[tuple[Any, int]]:
    if find_orthanc() is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    port = free_port()
    with orthanc_server({"bonescreen": ("BONESCREEN", "127.0.0.1", port)}) as orthanc:
        yield orthanc, port


def test_orthanc_round_trip(artifact: Path, tmp_path: Path, orthanc_and_port: tuple[Any, int]) -> None:
    """Orthanc pushes a CXR to the service by C-STORE; the SR and overlay come back to Orthanc."""
    import json

    orthanc, port = orthanc_and_port
    svc = _service(artifact, tmp_path / "data", dicom_port=port, dicom_host="127.0.0.1", allowed_aes=["ORTHANC"],
                   forward_cstore=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    svc.start()
    try:
        data = make_cxr_bytes(seed=31, patient_id="ORTH1")
        inst = orthanc.post("/instances", data, "application/dicom")
        assert isinstance(inst, dict)
        job = orthanc.post("/modalities/bonescreen/store", json.dumps({"Resources": [inst["ID"]],
                                                                       "Synchronous": True}).encode(),
                           "application/json")
        assert job is not None
        _wait_forwarded(svc, 1)
        study = inst["ParentStudy"]
        t0 = time.time()
        while True:
            instances = orthanc.get_json(f"/studies/{study}/instances")
            if len(instances) >= 3 or time.time() - t0 > 20:  # type: ignore[arg-type]
                break
            time.sleep(0.2)
        classes = sorted(_sop_class(orthanc, i["ID"]) for i in instances)  # type: ignore[union-attr]
        assert classes == sorted(["1.2.840.10008.5.1.4.1.1.1", SR_CLASS, SC_CLASS])
    finally:
        svc.stop()


def test_orthanc_stow_rs(artifact: Path, tmp_path: Path, orthanc_and_port: tuple[Any, int]) -> None:
    orthanc, _ = orthanc_and_port
    query = f'{{"Level": "Instance", "Query": {{"SOPClassUID": "{SR_CLASS}"}}}}'.encode()
    before = orthanc.post("/tools/find", query, "application/json")
    svc = _service(artifact, tmp_path / "data", dicom_enabled=False, forward_overlay=False,
                   forward_stow_url=f"{orthanc.url}/dicom-web")
    svc.start()
    try:
        svc.intake.accept_file_bytes(make_cxr_bytes(seed=41), "http")
        svc.notify()
        _wait_forwarded(svc, 1)
    finally:
        svc.stop()
    after = orthanc.post("/tools/find", query, "application/json")
    assert isinstance(before, list) and isinstance(after, list)
    assert len(set(after) - set(before)) == 1  # the SR arrived by STOW-RS (no overlay: forward_overlay off)


def _sop_class(orthanc: Any, instance_id: str) -> str:
    tags = orthanc.get_json(f"/instances/{instance_id}/simplified-tags")
    return str(tags["SOPClassUID"])  # type: ignore[index]
