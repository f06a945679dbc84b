"""Fuzzing, bounded in time: schemathesis against the app's own OpenAPI schema, every route's auth built
from the app's route table, and C-STORE of malformed data sets (hypothesis) to a live receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("hypothesis")

from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from bonescreen.service.api import PUBLIC_ROUTES, create_app
from bonescreen.service.auth import hash_password, new_token, token_digest
from bonescreen.service.config import ServiceConfig
from bonescreen.service.runtime import Service
from _service_support import free_port, make_cxr_dataset

SOP = "1.2.826.0.1.66.1"
PAGES = {"/worklist", "/admin/audit", "/monitor"}  # HTML: no principal -> redirect to the sign-in page


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Service, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = ServiceConfig(model="unused.pt", data_dir=str(tmp / "data"), dicom_enabled=False, worker_enabled=False,
                        max_upload_mb=1, forward_stow_url="http://127.0.0.1:9/dicom-web").validate()
    svc = Service(cfg)
    tokens = {}
    for name, role in (("viewer1", "viewer"), ("admin1", "admin")):
        u = svc.store.add_user(name, role, hash_password("fuzzing-password"))
        tokens[role] = new_token()
        svc.store.add_token(u.id, token_digest(tokens[role]))
    job = svc.store.enqueue(SOP, "1.2.826.0.1.66", "spool/x.dcm", "http")
    svc.store.claim("t:1:x", 1, 60)
    svc.store.complete(job.job_id, "t", {"eligible": True, "category": "normal", "score": 0.1})
    app = create_app(svc, manage=False, stop_on_shutdown=False)
    yield app, svc, tokens
    svc.stop()


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    # the routes of the included routers too (FastAPI keeps an included router as one entry of app.routes)
    for r in (c.original_route for c in iter_route_contexts(app.routes)):
        if isinstance(r, (APIRoute, Route)):
            for m in sorted(r.methods or ()):
                if m != "HEAD":
                    out.append((m, r.path))
    return out


def test_no_route_is_reachable_without_credentials(fuzz_env: tuple[Any, Service, dict[str, str]]) -> None:
    """Built from the app's own route table: a route added later is checked without editing this test."""
    app, _svc, tokens = fuzz_env
    routes = _routes(app)
    assert len(routes) >= 20 and set(PUBLIC_ROUTES) - {("GET", "/login/oidc"), ("GET", "/login/oidc/callback")} \
        <= set(routes)
    checked = 0
    with TestClient(app) as c:
        for method, path in routes:
            if (method, path) in PUBLIC_ROUTES:
                continue
            url = path.replace("{sop_instance_uid}", SOP)
            for headers in ({}, {"Authorization": "Bearer bst_wrong"}, {"X-API-Token": "nope"},
                            {"Cookie": "bonescreen_session=forged.value.sig"}):
                r = c.request(method, url, headers=headers, follow_redirects=False)
                if path in PAGES:
                    assert r.status_code == 303 and r.headers["location"] == "/login", (method, path, headers)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
            checked += 1
            # least privilege: a viewer reaches no admin route and changes nothing
            r = c.request(method, url, headers={"Authorization": f"Bearer {tokens['viewer']}"},
                          follow_redirects=False)
            if path.startswith(("/api/v1/audit", "/api/v1/users", "/api/v1/instances")) or method != "GET":
                assert r.status_code == 403, (method, path, r.status_code)
    assert checked >= 15


def test_schemathesis_no_server_errors_and_nothing_open(fuzz_env: tuple[Any, Service, dict[str, str]]) -> None:
    """Every operation of /openapi.json with generated input: never a 5xx as admin, always 401 without auth."""
    import schemathesis
    from schemathesis.checks import not_a_server_error

    app, _svc, tokens = fuzz_env
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=admin)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 12
    seen: dict[str, set[int]] = {}
    t0 = time.monotonic()
    for op in ops:
        @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            resp = case.call_and_validate(headers=admin, checks=[not_a_server_error])
            seen.setdefault(op.label, set()).add(resp.status_code)
            case.headers = {k: v for k, v in (case.headers or {}).items()
                            if k.lower() not in ("authorization", "x-api-token", "cookie")}
            if (op.method.upper(), op.path) not in PUBLIC_ROUTES:
                anonymous = case.call(allow_redirects=False).status_code
                assert anonymous == (303 if op.path in PAGES else 401), op.label

        run()
    elapsed = time.monotonic() - t0
    assert all(code < 500 for codes in seen.values() for code in codes)
    assert len(seen) == len(ops)
    print(f"schemathesis: {len(ops)} operations, {elapsed:.1f} s, statuses {sorted({c for v in seen.values() for c in v})}")


# ------------------------------------------------------------ C-STORE fuzz


def _mutations() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("truncate_pixels"), st.integers(0, 8000)),
        st.tuples(st.just("drop"), st.sampled_from(["PixelData", "Rows", "Columns", "BitsAllocated", "SOPClassUID",
                                                    "SOPInstanceUID", "PatientID", "StudyInstanceUID"])),
        st.tuples(st.just("rows"), st.integers(0, 70000)),
        st.tuples(st.just("bits"), st.sampled_from([0, 1, 7, 12, 24, 64])),
        st.tuples(st.just("uid"), st.text(max_size=80)),
        st.tuples(st.just("age"), st.text(max_size=8)),
        st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=400)),
        st.tuples(st.just("photometric"), st.sampled_from(["", "RGB", "PALETTE COLOR", "YBR_FULL", "X" * 16])),
        st.tuples(st.just("ok"), st.none()),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cstore_fuzz_malformed_datasets(tmp_path: Path) -> None:
    """Random damage to CR data sets over one association: each gets a status, the receiver stays up."""
    from pydicom.tag import Tag
    from pynetdicom import AE, _config

    cfg = ServiceConfig(model="unused.pt", data_dir=str(tmp_path / "data"), dicom_port=free_port(),
                        dicom_host="127.0.0.1", allowed_aes=["FUZZER"], worker_enabled=False).validate()
    svc = Service(cfg)
    svc.start()
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", svc.scp.port, ae_title="BONESCREEN")  # type: ignore[union-attr]
    assert assoc.is_established
    outcomes: list[tuple[str, int]] = []
    counter = iter(range(10_000))
    timings: list[float] = []

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(muts=st.lists(_mutations(), min_size=1, max_size=3))
    def send(muts: list[tuple[str, Any]]) -> None:
        nonlocal assoc
        ds = make_cxr_dataset(seed=next(counter), size=32)
        raw_tail = b""
        for kind, arg in muts:
            if kind == "truncate_pixels":
                ds.PixelData = ds.PixelData[: arg % (len(ds.PixelData) + 1)]
            elif kind == "drop" and arg in ds:
                del ds[arg]
            elif kind == "rows":
                ds.Rows = arg
            elif kind == "bits":
                ds.BitsAllocated = arg
            elif kind == "uid":
                ds.SOPInstanceUID = arg
            elif kind == "age":
                ds.PatientAge = arg
            elif kind == "garbage":
                raw_tail = arg
            elif kind == "photometric":
                ds.PhotometricInterpretation = arg
        if raw_tail:
            ds.add_new(Tag(0x0099, 0x0010), "LO", "x")  # a private element, then undecodable bytes
        t_send = time.monotonic()
        try:
            st_ = assoc.send_c_store(ds)
        except Exception:  # pynetdicom could not even encode it: nothing was sent
            outcomes.append(("unsendable", -1))
            return
        if not assoc.is_established:  # a peer may abort on garbage; the receiver must still answer anew
            assoc = ae.associate("127.0.0.1", svc.scp.port, ae_title="BONESCREEN")  # type: ignore[union-attr]
            assert assoc.is_established, "receiver stopped accepting associations"
            outcomes.append(("aborted", -1))
            return
        assert "Status" in st_, "no C-STORE response"
        outcomes.append(("+".join(k for k, _ in muts), int(st_.Status)))
        timings.append(time.monotonic() - t_send)

    old = _config.STORE_SEND_CHUNKED_DATASET
    try:
        send()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    # still up: an echo and a good image on the same association
    assert assoc.send_c_echo().Status == 0
    good = make_cxr_dataset(seed=99_999, size=32)
    assert assoc.send_c_store(good).Status == 0
    assoc.release()
    assert svc.health()["status"] == "ok"
    print(f"C-STORE fuzz: {len(outcomes)} objects, slowest answer {max(timings, default=0):.2f} s, "
          f"{sum(1 for _, s in outcomes if s == 0)} accepted")
    statuses = [s for _, s in outcomes if s >= 0]
    assert statuses and all(s == 0 or 0xA700 <= s <= 0xCFFF for s in statuses), outcomes
    # every accepted object is a queued job; nothing refused was queued
    accepted = sum(1 for s in statuses if s == 0) + 1
    assert svc.store.pending_count() == accepted
    assert any(s != 0 for s in statuses) and svc.scp is not None and svc.scp.refused >= 1
    svc.stop()
