"""``bonescreen serve``: receive CXRs from PACS (C-STORE) or HTTP, screen them, show a worklist."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def add_settings_args(p: argparse.ArgumentParser) -> None:
    """The options every service command shares: where the settings and the database are."""
    p.add_argument("--config", metavar="YAML", help="service settings file (keys as in the README's Settings)")
    p.add_argument("--data-dir", metavar="DIR", help="spool, results, keys and SQLite database "
                                                     "(default ./bonescreen-data)")
    p.add_argument("--db-url", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default SQLite in DATA_DIR; "
                                    "a password belongs in db_password_file or ~/.pgpass, not here)")


def load_settings(args: argparse.Namespace, keys: tuple[str, ...] = ("data_dir", "db_url")) -> Any:
    """YAML (``--config``) + ``BONESCREEN_SERVE__*`` environment + the flags in ``keys``."""
    from bonescreen.service.config import ServiceConfig

    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return ServiceConfig.load(getattr(args, "config", None), **overrides)


def open_store(args: argparse.Namespace) -> tuple[Any, Any]:
    """(settings, store) with the schema current (or the error that says how to make it so)."""
    from bonescreen.service.migrate import ensure_schema
    from bonescreen.service.store import Store

    cfg = load_settings(args)
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.database_url)
    ensure_schema(store, auto_upgrade=cfg.db_auto_upgrade, actor="cli")
    return cfg, store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        allow_abbrev=False,  # `--token X` must not silently become `--token-file X`
        help="run the screening service: DICOM receiver, HTTP API, worklist page and worker",
        description=(
            "Start a DICOM C-STORE receiver, an HTTP API with a worklist page, and a worker that "
            "screens every received image with the model(s). Received images are queued in the "
            "database (SQLite in DATA_DIR by default, or --db-url postgresql://...) before they are "
            "acknowledged, so a crash never loses one; a restart finishes what was queued. Several "
            "processes or hosts may share one PostgreSQL database (--worker-only for extra workers). "
            "Every HTTP endpoint except /health needs an account (bonescreen users) or the token in "
            "token_file. Settings come from a YAML file (--config), BONESCREEN_SERVE__<KEY> environment "
            "variables and these flags (flags win). Secrets are read from files named in the settings, "
            "never from the command line."
        ),
    )
    add_settings_args(p)
    p.add_argument("--model", metavar="PT", help="stage-2, three-class or stage-1 model artifact")
    p.add_argument("--stage1", metavar="PT", help="stage-1 osteoporosis model (cascade)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="inference engine (default torch)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--host", dest="http_host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", dest="http_port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--dicom-host", help="DICOM bind address (default 0.0.0.0)")
    p.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    p.add_argument("--ae-title", help="this service's AE title (default BONESCREEN)")
    p.add_argument("--allow-ae", dest="allowed_aes", action="append", metavar="AET",
                   help="calling AE title allowed to send (repeatable)")
    p.add_argument("--allow-any-ae", action="store_true", default=None, help="accept every calling AE title")
    p.add_argument("--no-dicom", dest="dicom_enabled", action="store_false", default=None,
                   help="no DICOM receiver (HTTP upload only)")
    p.add_argument("--no-http", dest="http_enabled", action="store_false", default=None,
                   help="no HTTP API / worklist in this process")
    p.add_argument("--no-worker", dest="worker_enabled", action="store_false", default=None,
                   help="no screening worker in this process (a receiver / API in front of other workers)")
    p.add_argument("--worker-only", action="store_true",
                   help="only the screening worker (and forwarding): an extra worker on a shared database")
    p.add_argument("--token-file", metavar="FILE", help="file holding a static API token (role token_role)")
    p.add_argument("--max-upload-mb", type=float, help="largest accepted object (default 64)")
    p.add_argument("--min-size", type=int, help="smallest eligible image side in pixels (gate; default 256)")
    p.add_argument("--ood", choices=["refuse", "flag", "off"],
                   help="out-of-distribution check, as `screen --ood` (default refuse; off is an explicit opt-out "
                        "recorded in every result)")
    p.add_argument("--site-profile", metavar="NAME",
                   help="decide with this site profile from the model artifact, as `screen --site-profile` "
                        "(setting site_profile; refused at start when the profile was made for other weights)")
    p.add_argument("--no-explain", dest="explain", action="store_false", default=None,
                   help="no Grad-CAM overlay (faster; the worklist then has no thumbnails)")
    p.add_argument("--no-sr", dest="write_sr", action="store_false", default=None,
                   help="no DICOM SR per study (nothing to forward)")
    p.add_argument("--batch-size", type=int, help="images per model batch (default 8)")
    p.add_argument("--store-patient-name", action="store_true", default=None,
                   help="keep PatientName for the worklist (default: patient id only)")
    p.add_argument("--keep-images", action="store_true", default=None,
                   help="keep received DICOMs after screening (default: deleted once the result is final)")
    p.add_argument("--forward-cstore", metavar="AET@HOST:PORT", help="send SR (+ overlay SC) to this PACS")
    p.add_argument("--forward-stow-url", metavar="URL", help="send SR (+ overlay SC) by DICOMweb STOW-RS")
    p.add_argument("--instance", help="name of this process in the queue (default host name; one live "
                                      "process per name)")
    p.add_argument("--debug-worker-delay", type=float, help=argparse.SUPPRESS)  # crash-recovery tests
    p.add_argument("--lease-seconds", type=float, help=argparse.SUPPRESS)
    p.set_defaults(func=handler)


KEYS = ("model", "stage1", "backend", "threads", "data_dir", "db_url", "http_host", "http_port", "dicom_host",
        "dicom_port", "ae_title", "allowed_aes", "allow_any_ae", "dicom_enabled", "http_enabled", "worker_enabled",
        "token_file", "max_upload_mb", "batch_size", "store_patient_name", "keep_images", "forward_cstore",
        "forward_stow_url", "instance", "debug_worker_delay", "lease_seconds", "explain", "write_sr", "ood",
        "site_profile")


def build_config(args: argparse.Namespace) -> Any:
    if getattr(args, "worker_only", False):
        args.http_enabled = False
        args.dicom_enabled = False
        args.worker_enabled = True
    cfg = load_settings(args, KEYS)
    if args.min_size is not None:
        cfg.gate = {**cfg.gate, "min_size": args.min_size}
    return cfg.validate()


def _signal_event() -> Any:
    """An event set by SIGINT/SIGTERM (installed before we say we are running)."""
    import signal
    import threading

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def handler(args: argparse.Namespace) -> int:
    from bonescreen.service.runtime import Service

    cfg = build_config(args)
    # pynetdicom logs association details (AE titles, UIDs) at INFO; keep only its warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    service = Service(cfg)
    service.start()  # outside uvicorn's lifespan so a bad model or port is a clear CLI error
    try:
        dicom = f"; DICOM receiver {cfg.ae_title} on port {service.scp.port}" if service.scp else ""
        n_users = len(service.store.users())
        if not cfg.http_enabled:
            stopping = _signal_event()
            print(f"bonescreen serve: instance {service.instance} running ({service.parts}){dicom}",
                  file=sys.stderr, flush=True)
            stopping.wait()
            return 0
        import uvicorn

        from bonescreen.service.api import create_app

        app = create_app(service, manage=False, stop_on_shutdown=True)
        print(f"bonescreen serve: worklist at http://{cfg.http_host}:{cfg.http_port}/worklist{dicom}",
              file=sys.stderr, flush=True)
        if n_users == 0 and not service.token:
            print("bonescreen serve: no accounts yet; create one with "
                  "`bonescreen users add NAME --role admin` (same --config/--data-dir)", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=cfg.http_host, port=int(cfg.http_port),
                                               access_log=False, log_level="warning", lifespan="on",
                                               proxy_headers=True, forwarded_allow_ips=cfg.forwarded_allow_ips))
        # uvicorn stops the service in the app's lifespan on SIGINT/SIGTERM, then re-raises the signal
        server.run()
        return 0 if server.started else 1
    finally:
        service.stop()  # idempotent; covers a server that never started
