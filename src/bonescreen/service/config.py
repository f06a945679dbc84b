"""Service configuration: one dataclass, from YAML and/or command-line flags.

Unknown YAML keys are an error, so a typo never silently runs a hospital
service with a default (for example an open calling-AE list).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonescreen.errors import BonescreenError


class ServiceConfigError(BonescreenError):
    """The service configuration is invalid or incomplete."""

    reason = "bad_service_config"


@dataclass
class ServiceConfig:
    """Everything ``bonescreen serve`` needs; see the README, "The screening service", for each key."""

    # --- model(s)
    model: str = ""
    stage1: str | None = None
    backend: str = "torch"  # or "onnx" (no Grad-CAM overlay then)
    threads: int | None = None
    threshold: float | None = None  # None: the artifact's
    threshold_stage1: float | None = None
    gate: dict[str, Any] = field(default_factory=dict)  # GatePolicy overrides (min_age, min_size, ...)
    explain: bool = True  # Grad-CAM overlay per screened image (needs the .pt artifact)
    write_sr: bool = True  # DICOM SR per screened image (what goes back to PACS)
    # --- storage
    data_dir: str = "bonescreen-data"
    db_url: str | None = None  # default sqlite:///<data_dir>/bonescreen.db
    keep_images: bool = False  # keep the received DICOM after its result (else deleted)
    store_patient_name: bool = False  # the worklist shows PatientName only when this is on
    hash_patient_id: bool = False  # store a keyed pseudonym instead of PatientID (worklist less useful)
    key_file: str | None = None  # HMAC key for pseudonyms; default <data_dir>/pseudonym.key (generated)
    # --- DICOM receiver
    dicom_enabled: bool = True
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    ae_title: str = "BONESCREEN"
    # Calling AE titles allowed to send; empty refuses every association unless
    # allow_any_ae is set explicitly.
    allowed_aes: list[str] = field(default_factory=list)
    allow_any_ae: bool = False
    # --- HTTP
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    token: str | None = None  # None: read $BONESCREEN_TOKEN, else generate one and print it once
    max_upload_mb: float = 64.0
    # --- worker
    batch_size: int = 8
    lease_seconds: float = 300.0
    max_attempts: int = 3
    poll_seconds: float = 0.2
    instance: str = ""  # name of this service instance (default: host name); leases are per instance
    debug_worker_delay: float = 0.0  # seconds slept per image (tests of crash recovery only)
    # --- forwarding of results back to PACS
    forward_cstore: str | None = None  # "AET@host:port"
    forward_calling_ae: str = "BONESCREEN"
    forward_stow_url: str | None = None  # DICOMweb base or studies URL
    forward_stow_token: str | None = None
    forward_overlay: bool = True  # also send the Grad-CAM secondary capture
    forward_max_attempts: int = 5

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def pseudonym_key_path(self) -> Path:
        """The HMAC key for patient pseudonyms: ``key_file``, else ``<data_dir>/pseudonym.key``."""
        return Path(self.key_file) if self.key_file else self.data_path / "pseudonym.key"

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_path / 'bonescreen.db').resolve()}"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolve_token(self) -> tuple[str, bool]:
        """(token, generated): the configured token, $BONESCREEN_TOKEN, or a fresh random one."""
        if self.token:
            return self.token, False
        env = os.environ.get("BONESCREEN_TOKEN")
        if env:
            return env, False
        return secrets.token_urlsafe(24), True

    def validate(self) -> ServiceConfig:
        if not self.model:
            raise ServiceConfigError("no model: pass --model PATH (a bonescreen .pt artifact)")
        if self.backend not in ("torch", "onnx"):
            raise ServiceConfigError(f"backend must be 'torch' or 'onnx', got {self.backend!r}")
        if self.dicom_enabled and not self.allowed_aes and not self.allow_any_ae:
            raise ServiceConfigError(
                "the DICOM receiver needs the calling AE titles it accepts: pass --allow-ae AET "
                "(repeatable), or --allow-any-ae to accept every sender, or --no-dicom"
            )
        for aet in [self.ae_title, *self.allowed_aes, self.forward_calling_ae]:
            if not aet or len(aet) > 16 or not aet.isascii() or "\\" in aet:
                raise ServiceConfigError(f"invalid AE title {aet!r} (1-16 ASCII characters, no backslash)")
        if self.forward_cstore:
            parse_cstore_target(self.forward_cstore)
        if self.batch_size < 1 or self.max_attempts < 1 or self.lease_seconds <= 0:
            raise ServiceConfigError("batch_size, max_attempts and lease_seconds must be positive")
        if self.max_upload_mb <= 0:
            raise ServiceConfigError("max_upload_mb must be positive")
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> ServiceConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ServiceConfigError(f"service config not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ServiceConfigError(f"{p}: expected a mapping of keys to values")
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ServiceConfigError(f"unknown service config key(s): {', '.join(unknown)}")
        return cls(**data)


def parse_cstore_target(value: str) -> tuple[str, str, int]:
    """``AET@host:port`` -> (aet, host, port)."""
    try:
        aet, rest = value.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return aet, host.strip("[]"), int(port)
    except ValueError as exc:
        raise ServiceConfigError(f"forward target must look like AET@host:port, got {value!r}") from exc
