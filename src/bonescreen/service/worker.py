"""The worker: claims queued images, screens them with the loaded model(s), stores one result each.

Screening itself is ``bonescreen.screen`` (gate, decode, preprocess,
cascade decision), ``bonescreen.explain`` (Grad-CAM) and
``bonescreen.dicom_out`` (SR, secondary capture); this module only runs them
over spooled files and writes what the worklist needs.

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
from bonescreen.service.config import ServiceConfig
from bonescreen.service.store import ClaimedJob, Store

__all__ = ["Screened", "ScreeningEngine", "Worker", "WorkerStats", "service_pseudonymiser"]

log = logging.getLogger(__name__)

MESSAGE_MAX = 500


@dataclass
class Screened:
    """What one image produced: the result row and the files written (relative to the data dir)."""

    row: dict[str, Any]
    overlay_rgb: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)  # "sr" / "overlay" / "sc" -> relative path


class ScreeningEngine:
    """Loaded model(s) + gate policy + thresholds + Grad-CAM, applied to DICOM files on disk."""

    def __init__(self, config: ServiceConfig) -> None:
        from bonescreen.gate import GatePolicy
        from bonescreen.screen import load_models

        self.config = config
        self.models = load_models(config.model, config.stage1, backend=config.backend, threads=config.threads,
                                  cache_dir=config.data_path / ".onnx")
        spec = self.models.main.spec
        self.policy = GatePolicy.from_eligibility(spec.eligibility, **(config.gate or {}))
        self.t2 = float(config.threshold if config.threshold is not None else spec.threshold)
        s1 = self.models.stage1
        self.t1 = float(config.threshold_stage1 if config.threshold_stage1 is not None else
                        (s1.spec.threshold if s1 is not None else 0.5))
        self.explainers: dict[str, Any] = {}
        if config.explain and self.models.main_torch is not None:
            from bonescreen.explain import Explainer, PediatricExplainer

            self.explainers["main"] = (PediatricExplainer if self.models.pediatric else Explainer)(
                self.models.main_torch)
            if self.models.stage1_torch is not None:
                self.explainers["stage1"] = Explainer(self.models.stage1_torch)

    @property
    def model_id(self) -> str:
        return str(self.models.main_id)

    def _prepare(self, path: Path) -> Any:
        """Gate, decode, preprocess one file -> ``screen.Prepared`` (row + images, or a skip row)."""
        from bonescreen.screen import InputItem, PrepContext, prepare

        ctx = PrepContext(self.policy, tuple(self.models.sizes), None, True, None, pediatric=self.models.pediatric)
        return prepare(InputItem(str(path)), ctx)

    def screen_files(self, paths: list[Path], out_dir: Path, names: list[str]) -> list[Screened]:
        """Screen a batch of DICOM files; never raises for one bad file (its row carries the reason).

        ``names`` are file stems for the outputs (hashes; no patient data in file names).
        """
        from bonescreen.screen import predict_batch

        preps = [self._prepare(p) for p in paths]
        out = [Screened(dict(p.row)) for p in preps]
        ok = [i for i, p in enumerate(preps) if p.images is not None]
        if ok:
            try:
                imgs = {s: np.stack([preps[i].images[s] for i in ok]) for s in self.models.sizes}
                clinical = [preps[i].clinical or {} for i in ok] if self.models.pediatric else None
                decided = predict_batch(self.models, imgs, threshold=self.t2, threshold_stage1=self.t1,
                                        clinical=clinical)
            except Exception as exc:  # a model failure must not lose the batch: record it per image
                log.exception("model failed on a batch of %d", len(ok))
                for i in ok:
                    out[i].row.update(eligible=False, reason="model_error", message=f"{type(exc).__name__}: {exc}")
                ok = []
            else:
                for i, d in zip(ok, decided):
                    out[i].row.update(d)
                    if out[i].row.get("pred_z") is not None:
                        _note(out[i].row, f"predicted Z-score {out[i].row['pred_z']:.2f}, "
                                          f"BMD {out[i].row['pred_bmd']:.3f} g/cm2")
                ok = [i for i in ok if out[i].row.get("eligible")]  # a pediatric model may refuse a row
        for i in ok:
            out[i].row["model"] = self.model_id
        if ok and self.explainers:
            self._explain([preps[i] for i in ok], [out[i] for i in ok])
        for i in ok:
            self._write_outputs(paths[i], out[i], out_dir, names[i])
        return out

    def _explain(self, preps: list[Any], outs: list[Screened]) -> None:
        from bonescreen.explain import overlay

        groups: dict[str, list[int]] = {}
        for j, o in enumerate(outs):
            key = "stage1" if o.row.get("category") == "osteoporosis" and "stage1" in self.explainers else "main"
            groups.setdefault(key, []).append(j)
        for key, idx in groups.items():
            ex = self.explainers[key]
            size = int(ex.loaded.size)
            imgs = np.stack([preps[j].images[size] for j in idx])
            classes: Any = None
            if self.models.pediatric:
                from bonescreen.screen import clinical_raw

                classes = clinical_raw([preps[j].clinical or {} for j in idx])  # clinical rows held fixed
            elif key == "main" and self.models.mode == "three_class":
                classes = [ex.loaded.spec.class_names.index(outs[j].row["category"]) for j in idx]
            try:
                cams = ex.cams(imgs, classes)
            except Exception as exc:  # the score stands without its picture
                log.warning("Grad-CAM failed on %d image(s): %s", len(idx), type(exc).__name__)
                continue
            for k, j in enumerate(idx):
                outs[j].overlay_rgb = overlay(imgs[k], cams[k])

    def _write_outputs(self, src: Path, s: Screened, out_dir: Path, name: str) -> None:
        from bonescreen.dicom_out import ScreeningResult, write_sc, write_sr
        from bonescreen.explain import save_png

        sub = Path("results") / name[:2]
        if s.overlay_rgb is not None:
            rel = sub / f"{name}.overlay.png"
            save_png(out_dir / rel, s.overlay_rgb)
            s.files["overlay"] = str(rel)
            if self.config.forward_overlay and (self.config.forward_cstore or self.config.forward_stow_url):
                rel = sub / f"{name}.SC.dcm"
                try:
                    write_sc(src, s.overlay_rgb, out_dir / rel, model_id=self.model_id)
                    s.files["sc"] = str(rel)
                except Exception as exc:
                    _note(s.row, f"secondary capture not written ({type(exc).__name__})")
        if not self.config.write_sr:
            return
        rel = sub / f"{name}.SR.dcm"
        try:
            result = ScreeningResult.from_row(s.row, self.models, threshold=self.t2, threshold_stage1=self.t1)
            write_sr(src, result, out_dir / rel)
            s.files["sr"] = str(rel)
        except Exception as exc:
            _note(s.row, f"SR not written ({type(exc).__name__}: {exc})")


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
            self.engine = ScreeningEngine(self.config)
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
        results = self.engine.screen_files(paths, self.data_dir, names)
        for job, path, res in zip(todo, paths, results):
            fields = self._result_fields(job, path, res)
            self.store.complete(job.id, self.worker_id, fields, forward=self.forward)
            log.info("job %d: %s", job.id, fields.get("category") or f"skipped ({fields.get('reason')})")
        self.stats.images += len(todo)
        self.stats.batches += 1
        self.stats.seconds += time.perf_counter() - t0
        self.stats.last_batch_at = time.time()

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
            "sr_path": res.files.get("sr"),
            "overlay_path": res.files.get("overlay"),
            "sc_path": res.files.get("sc"),
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


def service_pseudonymiser(config: ServiceConfig) -> Pseudonymiser:
    """The service's keyed pseudonyms (one key per data folder unless ``key_file`` names one)."""
    return _pseudonymiser(str(config.pseudonym_key_path))


@functools.lru_cache(maxsize=4)
def _pseudonymiser(path: str) -> Pseudonymiser:
    return Pseudonymiser.from_file(path)
