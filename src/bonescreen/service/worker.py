"""The worker: claims queued images, screens them with the loaded model(s), stores one result each.

Screening itself is ``bonescreen.screen.ScreeningEngine``: the gate, the OOD
check, decoding, preprocessing, the cascade and the decision are exactly
``bonescreen screen``'s (one engine; tested to give identical decisions),
Grad-CAM is the engine's, and the study SR is ``bonescreen.screen.outputs``'s.
This module only runs the engine over spooled files and writes what the
worklist needs: per image an overlay (and secondary capture when forwarding),
per **study** one SR referencing every eligible image received so far (rebuilt
when another image of the study arrives; a new SR instance per version, so a
PACS keeps the latest).

Pediatric models screen children the same way: height and weight come from
the DICOM header (PatientSize in metres, PatientWeight in kg); an image
without them gets a result with reason ``missing_clinical:<names>``. The
result's ``score`` is P(Z <= -2.0), ``category`` ``low_bmd``/``normal_bmd``,
and the message carries the predicted Z-score and BMD (the SR holds them as
measurements).

One worker thread per service process: the models are not thread-safe to
share and two CPU cores gain nothing from more. Several service processes on
one PostgreSQL database each run their own worker (SKIP LOCKED claims).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.pseudonym import Pseudonymiser
from bonescreen.screen import ScreeningEngine, load_engine
from bonescreen.service.config import ServiceConfig
from bonescreen.service.store import ClaimedJob, Store

__all__ = ["Screened", "Worker", "WorkerStats", "engine_for", "screen_files", "service_pseudonymiser"]

log = logging.getLogger(__name__)

MESSAGE_MAX = 500
#: Row columns kept in ``Result.scores_json`` (the study SR reports them per image; the site profile's
#: name and site probability travel with them: a profile changes no database column's meaning).
SR_SCORE_KEYS = ("score_stage2", "p_normal", "p_low_bone_mass", "p_osteoporosis", "pred_z", "pred_bmd",
                 "site_probability", "site_profile")


@dataclass
class Screened:
    """What one image produced: the result row and the files written (relative to the data dir)."""

    row: dict[str, Any]
    overlay_rgb: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)  # "overlay" / "sc" -> relative path


def engine_for(config: ServiceConfig) -> ScreeningEngine:
    """The service's engine: ``screen``'s, with the configuration's models, thresholds, gate, OOD policy
    and site profile (``site_profile``: the same decision as ``screen --site-profile``)."""
    return load_engine(
        config.model, config.stage1, backend=config.backend, threads=config.threads,
        cache_dir=config.data_path / ".onnx", threshold=config.threshold, threshold_stage1=config.threshold_stage1,
        gate=config.gate, ood=config.ood, explain=config.explain and config.backend != "onnx",
        include_patient_id=True,  # the worker reads and (optionally) pseudonymises the id itself
        site_profile=config.site_profile,
    )


def screen_files(engine: ScreeningEngine, config: ServiceConfig, paths: list[Path], out_dir: Path,
                 names: list[str]) -> list[Screened]:
    """Screen a batch of DICOM files; never raises for one bad file (its row carries the reason).

    ``names`` are file stems for the outputs (hashes; no patient data in file names).
    """
    preps = [engine.prepare(p) for p in paths]
    out = [Screened(p.row) for p in preps]
    ok = [i for i, p in enumerate(preps) if p.images is not None]
    if ok:
        try:
            engine.run_batch([preps[i] for i in ok])
        except Exception as exc:  # a model failure must not lose the batch: record it per image
            log.exception("model failed on a batch of %d", len(ok))
            for i in ok:
                out[i].row.update(eligible=False, reason="model_error", message=f"{type(exc).__name__}: {exc}")
            ok = []
        else:
            for i in ok:
                if out[i].row.get("pred_z") is not None and out[i].row.get("eligible"):
                    _note(out[i].row, f"predicted Z-score {out[i].row['pred_z']:.2f}, "
                                      f"BMD {out[i].row['pred_bmd']:.3f} g/cm2")
            ok = [i for i in ok if out[i].row.get("eligible")]  # refused by the OOD check or the model
    if ok and engine.explainers:
        for i, rgb in zip(ok, engine.overlays([preps[i] for i in ok])):
            out[i].overlay_rgb = rgb
    for i in ok:
        _write_image_outputs(engine, config, paths[i], out[i], out_dir, names[i])
    return out


def _write_image_outputs(engine: ScreeningEngine, config: ServiceConfig, src: Path, s: Screened, out_dir: Path,
                         name: str) -> None:
    from bonescreen.dicom_out import write_sc
    from bonescreen.gradcam import save_png

    if s.overlay_rgb is None:
        return
    sub = Path("results") / name[:2]
    rel = sub / f"{name}.overlay.png"
    save_png(out_dir / rel, s.overlay_rgb)
    s.files["overlay"] = str(rel)
    if config.forward_overlay and (config.forward_cstore or config.forward_stow_url):
        rel = sub / f"{name}.SC.dcm"
        try:
            write_sc(src, s.overlay_rgb, out_dir / rel, model_id=engine.model_id)
            s.files["sc"] = str(rel)
        except Exception as exc:
            _note(s.row, f"secondary capture not written ({type(exc).__name__})")


def _note(row: dict[str, Any], text: str) -> None:
    row["message"] = f"{row['message']}; {text}" if row.get("message") else text


def _read_patient(path: Path, want_name: bool) -> tuple[str | None, str | None]:
    """(PatientID, PatientName) from the header; name only when the configuration keeps names."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
    except Exception:
        return None, None
    pid = str(ds.get("PatientID", "") or "").strip() or None
    name = str(ds.get("PatientName", "") or "").strip() or None if want_name else None
    return pid, name


@dataclass
class WorkerStats:
    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    failures: int = 0
    last_batch_at: float = 0.0


class Worker:
    """The background thread: requeue stale leases, claim, screen, commit results, clean the spool."""

    def __init__(self, config: ServiceConfig, store: Store, engine: ScreeningEngine | None = None) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.instance = config.instance or socket.gethostname()
        self.worker_id = f"{self.instance}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.data_dir = config.data_path
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.forward = bool(config.forward_cstore or config.forward_stow_url)

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        if self.engine is None:
            self.engine = engine_for(self.config)
        n = self.store.requeue_stale(self.instance)
        if n:
            log.info("re-queued %d job(s) left in processing by an earlier run", n)
        self._thread = threading.Thread(target=self._run, name="bonescreen-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """A new job was committed: look now rather than at the next poll."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        last_requeue = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_requeue > self.config.lease_seconds / 2:
                    self.store.requeue_stale()
                    last_requeue = time.monotonic()
                jobs = self.store.claim(self.worker_id, self.config.batch_size, self.config.lease_seconds)
                if jobs:
                    self.process(jobs)
                    continue
                if not self.config.keep_images:
                    self.clean_spool()
            except Exception:  # the loop must survive a database hiccup; jobs stay leased and retry
                log.exception("worker loop error; retrying")
                self.stats.failures += 1
                self._stop.wait(1.0)
            self._wake.wait(self.config.poll_seconds)
            self._wake.clear()

    def process(self, jobs: list[ClaimedJob]) -> None:
        """Screen claimed jobs and commit one result each."""
        assert self.engine is not None
        t0 = time.perf_counter()
        todo: list[ClaimedJob] = []
        for job in jobs:
            if job.attempts > self.config.max_attempts:
                # it was claimed this many times without a result: it crashes or hangs the worker
                log.error("job %d failed %d times; recorded as failed", job.id, job.attempts - 1)
                self.store.complete(job.id, self.worker_id, {
                    "eligible": False, "reason": "processing_failed",
                    "message": f"screening did not finish in {job.attempts - 1} attempts"}, status="failed")
            else:
                todo.append(job)
        if not todo:
            return
        if self.config.debug_worker_delay > 0:
            for _ in todo:
                if self._stop.wait(self.config.debug_worker_delay):
                    break
        if self._stop.is_set():
            for job in todo:
                self.store.release(job.id)
            return
        paths = [self.data_dir / j.spool_path for j in todo]
        names = [hashlib.sha256(j.sop_instance_uid.encode()).hexdigest()[:40] for j in todo]
        results = screen_files(self.engine, self.config, paths, self.data_dir, names)
        for job, path, res in zip(todo, paths, results):
            fields = self._result_fields(job, path, res)
            study = fields.get("study_instance_uid")
            if self.config.write_sr and fields["eligible"] and study:
                fields["sr_path"] = self._study_sr(study, path, fields)
            done = self.store.complete(job.id, self.worker_id, fields, forward=self.forward)
            if done and fields.get("sr_path"):
                self.store.set_study_sr(study, fields["sr_path"])
            log.info("job %d: %s", job.id, fields.get("category") or f"skipped ({fields.get('reason')})")
        self.stats.images += len(todo)
        self.stats.batches += 1
        self.stats.seconds += time.perf_counter() - t0
        self.stats.last_batch_at = time.time()

    def _study_sr(self, study_uid: str, path: Path, fields: dict[str, Any]) -> str | None:
        """The study's SR over its eligible results so far plus this one; relative path, or None."""
        from bonescreen.screen.outputs import safe_name, sr_facts, study_result, write_study_sr
        from bonescreen.service.store import Result

        assert self.engine is not None
        rows = [r.as_row() for r in self.store.study_results(study_uid) if r.sop_instance_uid != fields[
            "sop_instance_uid"]]
        rows.append(Result(**{k: v for k, v in fields.items() if k in Result.__table__.columns}).as_row())
        study = study_result(rows)
        if not study["eligible"]:
            return None
        name = hashlib.sha256(study_uid.encode()).hexdigest()[:40]
        rel = Path("results") / name[:2] / f"{safe_name(name)}.study.SR.dcm"
        try:
            write_study_sr(rows, study, str(path), self.data_dir / rel, sr_facts(self.engine), self.engine.models.mode)
        except Exception as exc:
            _note(fields, f"SR not written ({type(exc).__name__}: {exc})")
            fields["message"] = str(fields["message"])[:MESSAGE_MAX]
            return None
        return str(rel)

    def _result_fields(self, job: ClaimedJob, path: Path, res: Screened) -> dict[str, Any]:
        row = res.row
        pid, name = _read_patient(path, self.config.store_patient_name)
        if pid and self.config.hash_patient_id:
            pid = service_pseudonymiser(self.config)(pid)
        study_date = None
        if row.get("study_date"):
            try:
                study_date = dt.date.fromisoformat(str(row["study_date"]))
            except ValueError:
                study_date = None
        message = str(row.get("message") or "")
        # io messages may start with the spool path; it says nothing useful to a user
        message = message.replace(str(path), "image")[:MESSAGE_MAX]
        return {
            "sop_instance_uid": job.sop_instance_uid,
            "study_instance_uid": job.study_instance_uid,
            "patient_id": (pid or None) and pid[:64],
            "patient_name": (name or None) and name[:128],
            "study_date": study_date,
            "sex": row.get("sex"),
            "age": row.get("age"),
            "eligible": bool(row.get("eligible")),
            "reason": row.get("reason") or None,
            "message": message or None,
            "score": row.get("score"),
            "score_stage1": row.get("score_stage1"),
            "category": row.get("category"),
            "flag": bool(row.get("flag")),
            "model": row.get("model") or (self.engine.model_id if self.engine else None),
            "sr_path": None,
            "overlay_path": res.files.get("overlay"),
            "sc_path": res.files.get("sc"),
            "series_instance_uid": row.get("series_instance_uid"),
            "accession_number": _clip(row.get("accession_number"), 64),
            "sop_class_uid": row.get("sop_class_uid"),
            "manufacturer": _clip(row.get("manufacturer"), 64),
            "manufacturer_model_name": _clip(row.get("manufacturer_model_name"), 64),
            "ood_score": row.get("ood_score"),
            "ood_check": row.get("ood_check"),
            "scores_json": json.dumps({k: row[k] for k in SR_SCORE_KEYS if row.get(k) is not None}) or None,
        }

    def clean_spool(self) -> int:
        """Delete received images whose result is final (the database keeps only the worklist facts)."""
        n = 0
        for job_id, rel in self.store.spool_paths_done():
            p = self.data_dir / rel
            try:
                p.unlink(missing_ok=True)
            except OSError:
                continue
            self.store.clear_spool_path(job_id)
            n += 1
        return n


def _clip(value: Any, n: int) -> str | None:
    return str(value)[:n] if value else None


def service_pseudonymiser(config: ServiceConfig) -> Pseudonymiser:
    """The service's keyed pseudonyms (one key per data folder unless ``key_file`` names one)."""
    return _pseudonymiser(str(config.pseudonym_key_path))


@functools.lru_cache(maxsize=4)
def _pseudonymiser(path: str) -> Pseudonymiser:
    return Pseudonymiser.from_file(path)
