"""Forwarding you can trust: STOW-RS partial failures, retries and the dead letter, storage commitment
(against Orthanc and a pynetdicom PACS), DICOM TLS for receiving and sending (certificates made here)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from bonescreen.service.config import ServiceConfig
from bonescreen.service.forward import STORAGE_COMMITMENT, CStoreSender, tls_client_context
from bonescreen.service.runtime import Service
from _service_support import (
    find_orthanc,
    free_port,
    make_cxr_bytes,
    make_cxr_dataset,
    make_test_pki,
    make_tiny_artifact,
    orthanc_server,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny.pt", size=32, min_size=32)


def _service(artifact: Path, data: Path, **kw: Any) -> Service:
    kw.setdefault("dicom_enabled", False)
    cfg = ServiceConfig(model=str(artifact), data_dir=str(data), poll_seconds=0.05, explain=False,
                        forward_backoff_seconds=0.1, token_role="admin", **kw).validate()
    svc = Service(cfg, token="t")
    svc.forwarder.poll_s = 0.05
    return svc


def _wait_forward(svc: Service, status: str, n: int = 1, timeout: float = 60) -> dict[str, int]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        fw = svc.store.counts()["forward"]
        if fw.get(status, 0) >= n:
            return fw
        time.sleep(0.05)
    raise AssertionError(f"forward status never reached {status}: {svc.store.counts()['forward']}")


# ------------------------------------------------------------------- STOW-RS


class _Stow(ThreadingHTTPServer):
    """A STOW-RS endpoint that answers as told: 'partial' = HTTP 202 with a FailedSOPSequence."""

    def __init__(self) -> None:
        self.mode = "partial"
        self.posts = 0
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                peer.posts += 1
                body: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": []}}
                code = 200
                if peer.mode == "partial":
                    code = 202
                    body["00081198"] = {"vr": "SQ", "Value": [{
                        "00081150": {"vr": "UI", "Value": [SR_CLASS]},
                        "00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                        "00081197": {"vr": "US", "Value": [0xA700]}}]}
                elif peer.mode == "error":
                    code = 503
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


def test_stow_202_with_failed_instances_is_not_success_and_dead_letters(artifact: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from bonescreen.service.api import create_app

    stow = _Stow()
    svc = _service(artifact, tmp_path / "data", forward_stow_url=stow.url, forward_max_attempts=3)
    try:
        with TestClient(create_app(svc)) as c:
            auth = {"Authorization": "Bearer t"}
            sop = svc.intake.accept_file_bytes(make_cxr_bytes(seed=3), "http").sop_instance_uid
            svc.notify()
            _wait_forward(svc, "dead_letter")
            assert stow.posts == 3  # every attempt was made, with back-off between them
            r = svc.store.get_result(sop)
            assert r is not None and r.forward_attempts == 3
            assert "stored only part" in (r.forward_error or "") and "0xA700" in (r.forward_error or "")
            # visible: metrics, the API, the worklist
            metrics = c.get("/metrics", headers=auth).text
            assert 'bonescreen_forward{status="dead_letter"} 1.0' in metrics
            assert 'bonescreen_forward_attempts_total{outcome="dead_letter"} 1.0' in metrics
            assert c.get("/api/v1/results", params={"forward_status": "dead_letter"},
                         headers=auth).json()["count"] == 1
            page = c.get("/worklist", params={"show": "dead_letter"}, headers=auth).text
            assert 'id="dead-letters"' in page and "fwd-dead_letter" in page and sop in page
            # the spool file stays while forwarding is pending, and goes once the result is final
            # an admin re-queues it; the PACS works again; it is delivered
            stow.mode = "ok"
            assert c.post(f"/api/v1/results/{sop}/forward", headers=auth).status_code == 200
            assert c.post(f"/api/v1/results/{sop}/forward", headers=auth).status_code == 409
            _wait_forward(svc, "done")
            assert svc.store.audit_events(action="forward_retry")[0].target == sop
    finally:
        svc.stop()
        stow.shutdown()


def test_stow_http_error_is_retried(artifact: Path, tmp_path: Path) -> None:
    stow = _Stow()
    stow.mode = "error"
    svc = _service(artifact, tmp_path / "data", forward_stow_url=stow.url, forward_max_attempts=5)
    svc.start()
    try:
        svc.intake.accept_file_bytes(make_cxr_bytes(seed=4), "http")
        svc.notify()
        t0 = time.time()
        while stow.posts < 2:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        r = svc.store.query_results()[0]
        assert r.forward_status == "pending" and "HTTP 503" in (r.forward_error or "")
        stow.mode = "ok"
        _wait_forward(svc, "done")
    finally:
        svc.stop()
        stow.shutdown()


# -------------------------------------------------------- storage commitment


class _CommitPeer:
    """A pynetdicom PACS: stores, then answers N-ACTION with an N-EVENT-REPORT on the same association."""

    def __init__(self, fail: bool = False) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.fail = fail
        self.stored: list[str] = []
        self.actions = 0
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(STORAGE_COMMITMENT)
        self.port = free_port()

        def on_store(event: Any) -> int:
            self.stored.append(str(event.dataset.SOPInstanceUID))
            return 0

        def on_action(event: Any) -> tuple[int, None]:
            from pydicom.dataset import Dataset

            self.actions += 1
            req = event.action_information
            info = Dataset()
            info.TransactionUID = req.TransactionUID
            refs = list(req.ReferencedSOPSequence)
            if self.fail:
                for r in refs:
                    r.FailureReason = 0x0110
                info.FailedSOPSequence = refs
            else:
                info.ReferencedSOPSequence = refs
            event.assoc.send_n_event_report(info, 2 if self.fail else 1, STORAGE_COMMITMENT,
                                            "1.2.840.10008.1.20.1.1")
            return 0x0000, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])

    def close(self) -> None:
        self.server.shutdown()


def test_storage_commitment_same_association(artifact: Path, tmp_path: Path) -> None:
    ok, bad = _CommitPeer(), _CommitPeer(fail=True)
    svc = _service(artifact, tmp_path / "a", dicom_enabled=True, dicom_port=free_port(), dicom_host="127.0.0.1",
                   allowed_aes=["PACS"], forward_cstore=f"PACS@127.0.0.1:{ok.port}", forward_commitment=True)
    svc.start()
    try:
        svc.intake.accept_file_bytes(make_cxr_bytes(seed=5), "http")
        svc.notify()
        _wait_forward(svc, "done")
        assert ok.actions == 1 and len(ok.stored) == 1
    finally:
        svc.stop()
        ok.close()
    svc = _service(artifact, tmp_path / "b", dicom_enabled=True, dicom_port=free_port(), dicom_host="127.0.0.1",
                   allowed_aes=["PACS"], forward_cstore=f"PACS@127.0.0.1:{bad.port}", forward_commitment=True,
                   forward_max_attempts=2)
    svc.start()
    try:
        svc.intake.accept_file_bytes(make_cxr_bytes(seed=6), "http")
        svc.notify()
        _wait_forward(svc, "dead_letter")
        r = svc.store.query_results()[0]
        assert bad.actions == 2 and "storage commitment failed for 1 instance(s) (0x0110)" in (r.forward_error or "")
    finally:
        svc.stop()
        bad.close()


def test_storage_commitment_report_that_never_comes_is_retried(artifact: Path, tmp_path: Path) -> None:
    from bonescreen.service.forward import ForwardLoop

    svc = _service(artifact, tmp_path / "data", forward_cstore="PACS@127.0.0.1:1", dicom_enabled=True,
                   allowed_aes=["PACS"], forward_commitment=True, forward_commit_timeout_seconds=0.2,
                   forward_max_attempts=2)

    class Silent:
        name = "cstore"

        def send(self, files: Any, on_commit_request: Any = None) -> Any:
            from bonescreen.service.forward import Sent

            on_commit_request("1.2.3.999")
            return Sent(commit_uid="1.2.3.999")

    job = svc.store.enqueue("1.2.3.7", None, "spool/x.dcm", "http")
    svc.store.claim("t:1:x", 1, 60)
    svc.store.complete(job.job_id, "t", {"eligible": True, "sr_path": "results/x.SR.dcm"}, forward=True)
    loop = ForwardLoop(svc.config, svc.store, [Silent()], backoff_s=0.0)
    loop.run_once()
    assert svc.store.counts()["forward"] == {"committing": 1}
    time.sleep(0.3)
    loop.run_once()  # expired -> pending (attempt 1 failed) -> sent again (attempt 2)
    assert svc.store.counts()["forward"] == {"committing": 1}
    time.sleep(0.3)
    loop.run_once()
    assert svc.store.counts()["forward"] == {"dead_letter": 1}
    assert "no storage commitment report" in (svc.store.query_results()[0].forward_error or "")
    svc.stop()


@pytest.fixture(scope="module")
def orthanc_and_port() -> Iterator[tuple[Any, int]]:
    if find_orthanc() is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    port = free_port()
    with orthanc_server({"bonescreen": ("BONESCREEN", "127.0.0.1", port)}) as orthanc:
        yield orthanc, port


def test_storage_commitment_against_orthanc(artifact: Path, tmp_path: Path,
                                            orthanc_and_port: tuple[Any, int]) -> None:
    """Orthanc commits the SR and reports it by N-EVENT-REPORT on a new association to the service's receiver."""
    orthanc, port = orthanc_and_port
    svc = _service(artifact, tmp_path / "data", dicom_enabled=True, dicom_port=port, dicom_host="127.0.0.1",
                   allowed_aes=["ORTHANC"], forward_cstore=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                   forward_commitment=True, forward_overlay=False)
    svc.start()
    try:
        sop = svc.intake.accept_file_bytes(make_cxr_bytes(seed=7), "http").sop_instance_uid
        svc.notify()
        _wait_forward(svc, "done")
        assert svc.scp is not None and svc.scp.reports >= 1  # the report came on Orthanc's own association
        r = svc.store.get_result(sop)
        assert r is not None and r.forward_commit_uid is None and r.forward_attempts == 1
    finally:
        svc.stop()
    found = orthanc.post("/tools/find", json.dumps({"Level": "Instance", "Query": {"SOPClassUID": SR_CLASS}})
                         .encode(), "application/json")
    assert isinstance(found, list) and len(found) >= 1


# ---------------------------------------------------------------- DICOM TLS


def _tls_assoc(port: int, ctx: ssl.SSLContext | None) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CR)
    return ae.associate("127.0.0.1", port, ae_title="BONESCREEN", tls_args=(ctx, "127.0.0.1") if ctx else None)


def test_dicom_tls_receiver_with_client_certificates(artifact: Path, tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    svc = _service(artifact, tmp_path / "data", dicom_enabled=True, dicom_port=free_port(), dicom_host="127.0.0.1",
                   allowed_aes=["MODALITY"], dicom_tls_cert_file=str(pki.server_cert),
                   dicom_tls_key_file=str(pki.server_key), dicom_tls_ca_file=str(pki.ca))
    svc.start()
    try:
        port = svc.scp.port  # type: ignore[union-attr]
        good = tls_client_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        assoc = _tls_assoc(port, good)
        assert assoc.is_established
        ds = make_cxr_dataset(seed=8)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        assert not _tls_assoc(port, None).is_established  # plain TCP: refused
        assert not _tls_assoc(port, tls_client_context(str(pki.ca))).is_established  # no client certificate
        other = make_test_pki(tmp_path / "other")
        assert not _tls_assoc(port, tls_client_context(str(other.ca), str(pki.client_cert),
                                                       str(pki.client_key))).is_established  # unknown server CA
        t0 = time.time()
        while not svc.store.all_result_sops():
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert svc.store.all_result_sops() == [str(ds.SOPInstanceUID)]
    finally:
        svc.stop()


def test_forward_over_dicom_tls(tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    pki = make_test_pki(tmp_path / "pki")
    got: list[str] = []
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(str(pki.ca))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append(str(e.dataset.SOPInstanceUID))
                                            or 0)])
    f = tmp_path / "x.dcm"
    f.write_bytes(make_cxr_bytes(seed=9))
    try:
        cfg = ServiceConfig(forward_cstore=f"PACS@127.0.0.1:{port}", forward_tls_ca_file=str(pki.ca),
                            forward_tls_cert_file=str(pki.client_cert), forward_tls_key_file=str(pki.client_key))
        from bonescreen.service.forward import ForwardError, senders_from_config

        (sender,) = senders_from_config(cfg)
        sender.send([f])
        assert len(got) == 1
        plain = CStoreSender(f"PACS@127.0.0.1:{port}", timeout=5)
        with pytest.raises(ForwardError, match="not established"):
            plain.send([f])
        no_cert = CStoreSender(f"PACS@127.0.0.1:{port}", timeout=5, tls=tls_client_context(str(pki.ca)))
        with pytest.raises(ForwardError, match="TLS"):
            no_cert.send([f])
        assert len(got) == 1
    finally:
        server.shutdown()
