"""Service settings: one typed pydantic model, from a YAML file, environment variables and flags.

Types are strict (pydantic ``strict=True``): in YAML, ``allow_any_ae: "false"``
(a quoted string) is refused rather than read as a truthy string,
``dicom_port: "11112x"`` is not a port, and ``allowed_aes: PACS1`` (a string,
not a list) is refused rather than split into characters. Environment
variables are text by nature, so for them pydantic-settings parses the text
by the field's type (``true``/``false``, ``8080``; lists and mappings as
JSON) and the strict check applies to the parsed value. Unknown keys are an
error: a typo never silently runs a hospital service on a default. Every
error names the key, the offending value (never for a secret) and where it
came from.

Precedence: command-line flags, then ``BONESCREEN_SERVE__<KEY>`` environment
variables, then the YAML file, then the defaults below.

Secrets are never settings values: the settings hold the *paths* of files
(``token_file``, ``key_file``, ``stow_token_file``, ``session_key_file``,
``oidc_client_secret_file``, ``db_password_file``, TLS key files), read at
start by :func:`read_secret_file`, so no secret appears on a command line
(``ps``), in a log line or in the settings' ``repr``.
"""

from __future__ import annotations

import contextvars
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bonescreen.errors import BonescreenError

__all__ = [
    "ENV_PREFIX",
    "ROLES",
    "ServiceConfig",
    "ServiceConfigError",
    "parse_cstore_target",
    "read_secret_file",
]

#: Environment variables: ``BONESCREEN_SERVE__HTTP_PORT=8443`` sets ``http_port``.
ENV_PREFIX = "BONESCREEN_SERVE__"
#: Account roles, least privilege first (see ``service.auth``).
ROLES = ("viewer", "reviewer", "admin")
Role = Literal["viewer", "reviewer", "admin"]


class ServiceConfigError(BonescreenError):
    """The service configuration is invalid or incomplete."""

    reason = "bad_service_config"


def _ae_title(value: str) -> str:
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.strip():
        raise ValueError("an AE title is 1-16 ASCII characters without a backslash")
    return value


def _cstore_target(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_cstore_target(value)
        except ServiceConfigError as exc:
            raise ValueError(str(exc)) from None
    return value


def _profile_name(value: str) -> str:
    from bonescreen.adapt.profile import ProfileError, check_name

    try:
        return check_name(value)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: any free port (tests)
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
GateValue = int | float | bool | str | list[str]
#: Keys whose values are secret (or may hold one): their values never appear in an error message.
SECRET_KEYS = frozenset({"db_url"})

_YAML: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("bonescreen_serve_yaml", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file's mapping (set by :meth:`ServiceConfig.from_yaml`), below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        data = _YAML.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML.get() or {})


class ServiceConfig(BaseSettings):
    """Everything ``bonescreen serve`` needs; see the README, "The screening service", for each key."""

    model_config = SettingsConfigDict(
        strict=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        validate_default=True,
        validate_assignment=True,
        hide_input_in_errors=False,
    )

    # --- model(s)
    model: str = ""
    stage1: str | None = None
    backend: Literal["torch", "onnx"] = "torch"  # onnx: no Grad-CAM overlay
    threads: PositiveInt | None = None
    threshold: Probability | None = None  # None: the artifact's
    threshold_stage1: Probability | None = None
    gate: dict[str, GateValue] = Field(default_factory=dict)  # GatePolicy overrides (min_age, min_size, ...)
    explain: bool = True  # Grad-CAM overlay per screened image (needs the .pt artifact)
    write_sr: bool = True  # DICOM SR per screened study (what goes back to PACS)
    ood: Literal["refuse", "flag", "off"] = "refuse"  # out-of-distribution check (as `screen --ood`)
    # a site profile stored in the model artifact (as `screen --site-profile`): its cut-off, site
    # probability and abstain band decide; refused at start when it was made for other weights
    site_profile: Annotated[str, AfterValidator(_profile_name)] | None = None
    # --- storage
    data_dir: str = "bonescreen-data"
    db_url: str | None = Field(default=None, repr=False)  # default sqlite:///<data_dir>/bonescreen.db
    db_password_file: str | None = None  # the PostgreSQL password, kept out of db_url
    db_auto_upgrade: bool = True  # serve migrates the schema at start (else refuses and names the command)
    keep_images: bool = False  # keep the received DICOM after its result (else deleted)
    store_patient_name: bool = False  # the worklist shows PatientName only when this is on
    hash_patient_id: bool = False  # store a keyed pseudonym instead of PatientID (worklist less useful)
    key_file: str | None = None  # HMAC key for pseudonyms; default <data_dir>/pseudonym.key (generated)
    # --- which parts this process runs (several processes or hosts may share one database)
    worker_enabled: bool = True
    http_enabled: bool = True
    # --- DICOM receiver
    dicom_enabled: bool = True
    dicom_host: str = "0.0.0.0"
    dicom_port: Port = 11112
    ae_title: AETitle = "BONESCREEN"
    # Calling AE titles allowed to send; empty refuses every association unless
    # allow_any_ae is set explicitly.
    allowed_aes: list[AETitle] = Field(default_factory=list)
    allow_any_ae: bool = False
    dicom_tls_cert_file: str | None = None  # DICOM TLS for the receiver: certificate (PEM) ...
    dicom_tls_key_file: str | None = None  # ... and its private key
    dicom_tls_ca_file: str | None = None  # when set, senders must present a certificate signed by this CA
    # --- HTTP
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    forwarded_allow_ips: str = "127.0.0.1"  # proxies whose X-Forwarded-For/-Proto are believed (uvicorn)
    token_file: str | None = None  # a static API token for scripts and monitoring (role: token_role)
    token_role: Role = "viewer"
    max_upload_mb: Positive = 64.0
    session_hours: Positive = 8.0  # the worklist's signed session cookie expires after this
    session_key_file: str | None = None  # signs session cookies; default <data_dir>/session.key (generated)
    login_max_failures: PositiveInt = 5  # failed sign-ins per account or address ...
    login_window_minutes: Positive = 15.0  # ... within this window, then sign-in is refused for the window
    oidc_issuer: str | None = None  # OpenID Connect single sign-on: the issuer URL (discovery is read from it)
    oidc_client_id: str | None = None
    oidc_client_secret_file: str | None = None
    oidc_scopes: str = "openid profile email"
    oidc_username_claim: str = "preferred_username"
    oidc_default_role: Role | None = None  # None: only accounts that exist may sign in by SSO
    oidc_redirect_url: str | None = None  # default: <this server>/login/oidc/callback
    # --- worker
    batch_size: PositiveInt = 8
    lease_seconds: Positive = 60.0  # renewed while the worker lives; a killed worker's jobs return after it
    max_attempts: PositiveInt = 3
    poll_seconds: Positive = 0.2
    instance: str = ""  # name of this process in the queue (default: host name); one live process per name
    debug_worker_delay: Annotated[float, Field(ge=0)] = 0.0  # seconds slept per image (crash tests only)
    # --- forwarding of results back to PACS
    forward_cstore: str | None = None  # "AET@host:port"
    forward_calling_ae: AETitle = "BONESCREEN"
    forward_stow_url: str | None = None  # DICOMweb base or studies URL
    stow_token_file: str | None = None  # bearer token for STOW-RS
    forward_overlay: bool = True  # also send the Grad-CAM secondary capture
    forward_max_attempts: PositiveInt = 5  # then the result is dead-lettered (worklist, metrics)
    forward_backoff_seconds: Positive = 5.0  # first retry delay; doubles each attempt ...
    forward_backoff_max_seconds: Positive = 3600.0  # ... up to this
    forward_commitment: bool = False  # C-STORE: ask for storage commitment (N-ACTION), done on N-EVENT-REPORT
    forward_commit_timeout_seconds: Positive = 300.0  # no report in this time: the attempt failed
    forward_tls_ca_file: str | None = None  # DICOM TLS when forwarding by C-STORE: the peer's CA ...
    forward_tls_cert_file: str | None = None  # ... and our client certificate / key, if the peer asks
    forward_tls_key_file: str | None = None
    # --- monitoring (/monitor: DXA results that arrived later, joined to this store's results)
    monitor_dxa: list[str] = Field(default_factory=list)  # DXA export file(s), read at each page view
    monitor_columns: str | None = None  # their column map or preset (lunar, hologic, osteosys), as `cohort --columns`
    monitor_date_format: str | None = None  # strptime format of non-ISO DXA dates, e.g. %m/%d/%Y
    monitor_config: str | None = None  # monitor.yaml: window, grouping, reference, alert floors

    @field_validator("forward_cstore")
    @classmethod
    def _check_target(cls, v: str | None) -> str | None:
        return _cstore_target(v)

    @field_validator("oidc_issuer", "forward_stow_url", "oidc_redirect_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ServiceConfigError(_describe(exc, data)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)

    # ------------------------------------------------------------ derived

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def pseudonym_key_path(self) -> Path:
        """The HMAC key for patient pseudonyms: ``key_file``, else ``<data_dir>/pseudonym.key``."""
        return Path(self.key_file) if self.key_file else self.data_path / "pseudonym.key"

    @property
    def session_key_path(self) -> Path:
        return Path(self.session_key_file) if self.session_key_file else self.data_path / "session.key"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with the password from ``db_password_file`` when one is given."""
        if not self.db_url:
            return f"sqlite:///{(self.data_path / 'bonescreen.db').resolve()}"
        if not self.db_password_file:
            return self.db_url
        from sqlalchemy.engine import make_url

        url = make_url(self.db_url).set(password=read_secret_file(self.db_password_file, "db_password_file"))
        return url.render_as_string(hide_password=False)

    @property
    def database_url_masked(self) -> str:
        """For messages: the database URL with any password replaced by ``***``."""
        if not self.db_url:
            return self.database_url
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.db_url).render_as_string(hide_password=True)
        except Exception:
            return "(unparsable db_url)"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def forwarding(self) -> bool:
        return bool(self.forward_cstore or self.forward_stow_url)

    @property
    def instance_name(self) -> str:
        import socket

        return self.instance or socket.gethostname()

    def public_dict(self) -> dict[str, Any]:
        """The settings without secrets (the database password masked): for the audit trail."""
        d = self.model_dump()
        d["db_url"] = self.database_url_masked if self.db_url else None
        return d

    def validate(self) -> ServiceConfig:  # type: ignore[override]
        """Checks across keys that make a configuration runnable (types were checked on construction)."""
        if not self.model and self.worker_enabled:
            raise ServiceConfigError("no model: pass --model PATH (a bonescreen .pt artifact)")
        if self.dicom_enabled and not self.allowed_aes and not self.allow_any_ae:
            raise ServiceConfigError(
                "the DICOM receiver needs the calling AE titles it accepts: pass --allow-ae AET "
                "(repeatable), or --allow-any-ae to accept every sender, or --no-dicom"
            )
        if bool(self.dicom_tls_cert_file) != bool(self.dicom_tls_key_file):
            raise ServiceConfigError("DICOM TLS needs both dicom_tls_cert_file and dicom_tls_key_file")
        if self.dicom_tls_ca_file and not self.dicom_tls_cert_file:
            raise ServiceConfigError("dicom_tls_ca_file (client certificates) needs dicom_tls_cert_file/key_file")
        if bool(self.forward_tls_cert_file) != bool(self.forward_tls_key_file):
            raise ServiceConfigError("forward_tls_cert_file and forward_tls_key_file go together")
        if (self.forward_tls_ca_file or self.forward_tls_cert_file) and not self.forward_cstore:
            raise ServiceConfigError("forward_tls_* settings need forward_cstore")
        if self.forward_commitment and not self.forward_cstore:
            raise ServiceConfigError("forward_commitment (storage commitment) needs forward_cstore")
        if self.forward_commitment and not self.dicom_enabled:
            raise ServiceConfigError("forward_commitment needs the DICOM receiver: the PACS may send its "
                                     "N-EVENT-REPORT on a new association to this service")
        if self.site_profile and self.threshold is not None:
            raise ServiceConfigError(f"threshold and site_profile {self.site_profile} both set the cut-off; the "
                                     "profile holds the site's cut-off (remove threshold)")
        if self.oidc_issuer and not (self.oidc_client_id and self.oidc_client_secret_file):
            raise ServiceConfigError("oidc_issuer needs oidc_client_id and oidc_client_secret_file")
        if self.gate:
            import dataclasses

            from bonescreen.screen.gate import GatePolicy

            known = {f.name for f in dataclasses.fields(GatePolicy)}
            unknown = sorted(set(self.gate) - known)
            if unknown:
                raise ServiceConfigError(f"gate: unknown key(s) {', '.join(unknown)} "
                                         f"(known: {', '.join(sorted(known))})")
        return self

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServiceConfig:
        """YAML file (optional) + environment + ``overrides`` (flags; ``None`` values ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            import yaml

            p = Path(path)
            if not p.is_file():
                raise ServiceConfigError(f"service config not found: {p}")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ServiceConfigError(f"{p}: not valid YAML ({exc})") from None
            if not isinstance(data, dict):
                raise ServiceConfigError(f"{p}: expected a mapping of keys to values")
            bad = [k for k in data if not isinstance(k, str)]
            if bad:
                raise ServiceConfigError(f"{p}: keys must be text, got {bad[0]!r}")
        tok = _YAML.set(data)
        try:
            try:
                return cls(**{k: v for k, v in overrides.items() if v is not None})
            except ServiceConfigError as exc:
                raise ServiceConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
        finally:
            _YAML.reset(tok)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> ServiceConfig:
        return cls.load(path, **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConfig:
        return cls(**data)


def _describe(exc: ValidationError, given: dict[str, Any]) -> str:
    """One line per error: ``key: what is wrong (got VALUE, from SOURCE)``."""
    lines = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        key = loc[0] if loc else "?"
        where = ".".join(loc)
        if err.get("type") == "extra_forbidden":
            lines.append(f"unknown service config key(s): {where}")
            continue
        value = err.get("input")
        shown = "(hidden)" if key in SECRET_KEYS else repr(value)
        env = ENV_PREFIX + key.upper()
        source = "flag" if key in given else f"${env}" if env in {k.upper() for k in os.environ} else "config"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg} (got {shown}, from {source})")
    return "; ".join(lines)


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    """The stripped text of a secret file; refuses a missing, empty or world-readable file."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text().strip()
    except FileNotFoundError:
        raise ServiceConfigError(f"{what}: file not found: {p}") from None
    except OSError as exc:
        raise ServiceConfigError(f"{what}: cannot read {p}: {exc.strerror or exc}") from None
    if os.name == "posix" and st.st_mode & stat.S_IROTH:
        raise ServiceConfigError(f"{what}: {p} is readable by every user (mode {stat.S_IMODE(st.st_mode):o}); "
                                 f"run: chmod 600 {p}")
    if not text:
        raise ServiceConfigError(f"{what}: {p} is empty")
    return text


def parse_cstore_target(value: str) -> tuple[str, str, int]:
    """``AET@host:port`` -> (aet, host, port)."""
    try:
        aet, rest = value.split("@", 1)
        host, port_s = rest.rsplit(":", 1)
        port = int(port_s)
        if not aet or not host or not 0 < port < 65536 or len(aet) > 16:
            raise ValueError
        return aet, host.strip("[]"), port
    except ValueError as exc:
        raise ServiceConfigError(f"forward target must look like AET@host:port, got {value!r}") from exc
