"""Test support for the service: tiny synthetic CXR DICOMs, a tiny model, a throwaway PostgreSQL.

Test support, so it lives under tests/ and does not ship in the package. From a
checkout, a developer's shell reaches it with ``PYTHONPATH=tests`` (see the README's
"Try it out locally").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

__all__ = [
    "FakeOIDCProvider",
    "PostgresCluster",
    "PKIFiles",
    "find_pg_bin",
    "free_port",
    "make_cxr_bytes",
    "make_cxr_dataset",
    "make_test_pki",
    "make_tiny_artifact",
    "postgres_cluster",
    "reset_database",
    "widen_ood_threshold",
]

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_cxr_dataset(
    *,
    seed: int = 0,
    size: int = 64,
    patient_id: str = "TEST0001",
    patient_name: str = "TEST^PATIENT",
    age: str = "065Y",
    sex: str = "F",
    view: str = "PA",
    modality: str = "CR",
    study_date: str = "20240115",
    study_uid: str | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    """A small 12-bit CR (or DX) 'chest radiograph' of random texture, Explicit VR Little Endian."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = 1500 + 1200 * np.exp(-((xx - 0.5) ** 2) / 0.02) + 600 * np.sin(8 * np.pi * yy)
    img = np.clip(base + rng.normal(0, 250, (size, size)), 0, 4095).astype(np.uint16)

    sop = UID(sop_uid) if sop_uid else generate_uid()
    sop_class = UID(CR_STORAGE if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid or str(generate_uid())
    ds.SeriesInstanceUID = str(generate_uid())
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientAge = age
    ds.PatientSex = sex
    ds.PatientBirthDate = ""
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.AccessionNumber = f"A{seed:06d}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "bonescreen-test"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.5]
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelData = img.tobytes()
    return ds


def make_cxr_bytes(**kwargs: object) -> bytes:
    """The Part-10 file bytes of :func:`make_cxr_dataset`."""
    import io

    ds = make_cxr_dataset(**kwargs)  # type: ignore[arg-type]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_tiny_artifact(path: str | os.PathLike[str], *, seed: int = 0, size: int = 64, min_size: int = 32,
                       arch: str = "convnext_atto", task: str = "stage2", threshold: float = 0.5,
                       ood: bool = True) -> Path:
    """A random-weight model artifact small enough for CPU tests (no download).

    ``ood``: fit its OOD part on :func:`make_cxr_dataset` images (seeds 10000+), the kind
    of image the service tests send, as training fits one on the training split.
    """
    import torch

    from bonescreen.artifact import ModelSpec, save_artifact
    from bonescreen.models import create_model

    torch.manual_seed(seed)
    spec = ModelSpec.for_task(arch, task)
    spec.preprocess["size"] = size
    spec.threshold = threshold
    spec.eligibility = {**spec.eligibility, "min_size": min_size}
    spec.model_card = {"note": "random weights, tests only"}
    model = create_model(arch, spec.num_classes)
    save_artifact(Path(path), model, spec)
    if ood:
        from bonescreen.ood import attach_ood
        from bonescreen.preprocess import preprocess_array

        imgs = np.stack([preprocess_array(make_cxr_dataset(seed=10_000 + i, size=max(min_size, 64)).pixel_array
                                          .astype(np.float32), size) for i in range(48)])
        attach_ood(Path(path), imgs[::2], None, imgs[1::2])
        widen_ood_threshold(Path(path), 1.5)
    return Path(path)


def widen_ood_threshold(path: Path, factor: float) -> None:
    """Test fixtures only: a threshold from 24 tuning images of a random-weight model sits close to
    the largest in-distribution score (measured: 0.97-0.99 of it over 200 other seeds); widening it
    keeps the service tests about the service. How well the OOD check separates is measured on a
    trained model by bench/bench_ood.py."""
    import torch

    from bonescreen.artifact import atomic_torch_save

    payload = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("threshold", "flag_threshold"):  # the flag band too: the same images stay unflagged
        if payload["ood"].get(key) is not None:
            payload["ood"][key] = float(payload["ood"][key]) * factor
    atomic_torch_save(payload, path)


# ----------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path | None:
    """The folder with initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


@dataclass
class PostgresCluster:
    data_dir: Path
    port: int
    bin_dir: Path
    run_as: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, args: list[str]) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return args

    def start(self) -> None:
        subprocess.run(self._cmd([str(self.bin_dir / "initdb"), "-D", str(self.data_dir / "db"), "-U", "postgres",
                                  "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        opts = (f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        subprocess.run(self._cmd([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "db"), "-o", opts,
                                  "-l", str(self.data_dir / "postgres.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)

    def stop(self) -> None:
        subprocess.run(self._cmd([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "db"), "-m", "immediate",
                                  "-w", "stop"]), capture_output=True, timeout=60)


def reset_database(url: str) -> None:
    """Empty a test database completely (tables, alembic_version, trigger functions)."""
    from sqlalchemy import create_engine, text

    from bonescreen.service.store import normalise_url

    engine = create_engine(normalise_url(url))
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("DROP SCHEMA public CASCADE"))
                conn.execute(text("CREATE SCHEMA public"))
            else:
                for (name,) in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).all():
                    conn.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
    finally:
        engine.dispose()


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL server in a temp folder (trust auth on 127.0.0.1, no fsync).

    As root the server runs as the ``postgres`` user (PostgreSQL refuses root).
    Raises FileNotFoundError when the server binaries are not installed.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            import pwd

            pw = pwd.getpwnam(run_as)
        except KeyError as exc:
            raise FileNotFoundError("running as root but there is no 'postgres' user to run the server") from exc
    tmp = Path(tempfile.mkdtemp(prefix="bonescreen-pg-"))
    if run_as:
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    cluster = PostgresCluster(tmp, free_port(), bin_dir, run_as)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------- Orthanc


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get_json(self, path: str) -> object:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> object:
        import json
        import urllib.request

        req = urllib.request.Request(self.url + path, data=data, method="POST")
        req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read()
        return json.loads(body) if body else None


def find_orthanc() -> str | None:
    return shutil.which("Orthanc")


@contextmanager
def orthanc_server(modalities: dict[str, tuple[str, str, int]] | None = None, aet: str = "ORTHANC"
                   ) -> Iterator[OrthancServer]:
    """A throwaway Orthanc PACS (Debian package ``orthanc``, plus ``orthanc-dicomweb`` for STOW-RS)."""
    import json
    import urllib.request

    exe = find_orthanc()
    if exe is None:
        raise FileNotFoundError("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    folder = Path(tempfile.mkdtemp(prefix="bonescreen-orthanc-"))
    http_port, dicom_port = free_port(), free_port()
    plugins = [str(p) for p in Path("/usr/share/orthanc/plugins").glob("libOrthancDicomWeb.so*")]
    cfg = {
        "Name": "bonescreen-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": plugins, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()}, "StableAge": 1,
        "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(cfg))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = OrthancServer(http_port, dicom_port, aet, folder)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(server.url + "/system", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def send_folder(folder: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 11112, *,
                calling_ae: str = "STORESCU", called_ae: str = "BONESCREEN") -> dict[str, int]:
    """C-STORE every DICOM file under ``folder`` (a try-out sender; proposes one context per
    SOP class and transfer syntax, so mixed compressed/uncompressed folders go through).

    Returns counts by outcome: ``success``, ``failed`` (a failure status), ``skipped`` (not DICOM).
    """
    import pydicom
    from pynetdicom import AE

    files: list[tuple[Path, str, str]] = []
    skipped = 0
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            meta = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            files.append((p, str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
        except Exception:
            skipped += 1
    out = {"success": 0, "failed": 0, "skipped": skipped}
    pairs = sorted({(c, t) for _, c, t in files})
    for start in range(0, len(pairs), 120):  # at most 128 presentation contexts per association
        chunk = set(pairs[start:start + 120])
        ae = AE(ae_title=calling_ae)
        for c, t in chunk:
            ae.add_requested_context(c, [t])
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise ConnectionError(f"association with {called_ae}@{host}:{port} refused or failed")
        try:
            for p, c, t in files:
                if (c, t) in chunk:
                    st = assoc.send_c_store(p)
                    out["success" if getattr(st, "Status", None) == 0 else "failed"] += 1
        finally:
            assoc.release()
    return out


# ------------------------------------------------------------------ TLS (tests)


@dataclass
class PKIFiles:
    """A throwaway CA with a server certificate (127.0.0.1 / localhost) and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_pki(folder: str | os.PathLike[str], name: str = "bonescreen-test") -> PKIFiles:
    """Certificates made at test time with ``cryptography`` (keys mode 0600); never use them for real."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def write_cert(c: x509.Certificate, path: Path) -> Path:
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, san: list[Any]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    srv, srv_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli, cli_key = leaf("bonescreen-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return PKIFiles(write_cert(ca, out / "ca.pem"), write_cert(srv, out / "server.pem"),
                   write_key(srv_key, out / "server.key"), write_cert(cli, out / "client.pem"),
                   write_key(cli_key, out / "client.key"))


# -------------------------------------------------------------- OIDC (tests)


class FakeOIDCProvider:
    """An in-process OpenID Connect provider on 127.0.0.1: discovery, JWKS, authorize, token (signed ID token).

    ``user`` holds the claims the next sign-in gets; ``bad_signature`` signs ID tokens with a key that is
    not in the JWKS. Authorization codes are single use. For tests only.
    """

    def __init__(self, client_id: str, client_secret: str) -> None:
        import json
        import secrets as _secrets
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from joserfc import jwt
        from joserfc.jwk import RSAKey

        self.client_id, self.client_secret = client_id, client_secret
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.rogue = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.user: dict[str, Any] = {"sub": "idp-0001", "preferred_username": "carol"}
        self.bad_signature = False
        self.codes: dict[str, dict[str, Any]] = {}
        self.token_requests = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/.well-known/openid-configuration":
                    b = provider.issuer
                    self._json(200, {"issuer": b, "authorization_endpoint": f"{b}/authorize",
                                     "token_endpoint": f"{b}/token", "jwks_uri": f"{b}/jwks",
                                     "response_types_supported": ["code"], "subject_types_supported": ["public"],
                                     "id_token_signing_alg_values_supported": ["RS256"],
                                     "code_challenge_methods_supported": ["S256"],
                                     "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                                               "client_secret_post"]})
                elif url.path == "/jwks":
                    self._json(200, {"keys": [provider.key.as_dict(private=False)]})
                elif url.path == "/authorize":
                    if q.get("client_id") != provider.client_id or q.get("response_type") != "code":
                        self._json(400, {"error": "invalid_request"})
                        return
                    code = _secrets.token_urlsafe(16)
                    provider.codes[code] = {"nonce": q.get("nonce"), "redirect_uri": q.get("redirect_uri"),
                                            "user": dict(provider.user)}
                    loc = f"{q['redirect_uri']}?{urllib.parse.urlencode({'code': code, 'state': q.get('state')})}"
                    self.send_response(302)
                    self.send_header("Location", loc)
                    self.end_headers()
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                import base64
                import time as _time

                provider.token_requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = dict(urllib.parse.parse_qsl(body))
                cid, secret = form.get("client_id"), form.get("client_secret")
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                    cid, secret = urllib.parse.unquote(cid), urllib.parse.unquote(secret)
                grant = provider.codes.pop(form.get("code", ""), None)
                if (cid, secret) != (provider.client_id, provider.client_secret):
                    self._json(401, {"error": "invalid_client"})
                    return
                if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
                    self._json(400, {"error": "invalid_grant"})
                    return
                now = int(_time.time())
                claims = {"iss": provider.issuer, "aud": provider.client_id, "iat": now, "exp": now + 300,
                          "nonce": grant["nonce"], **grant["user"]}
                key = provider.rogue if provider.bad_signature else provider.key
                id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
                self._json(200, {"access_token": _secrets.token_urlsafe(16), "token_type": "Bearer",
                                 "expires_in": 300, "id_token": id_token})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
