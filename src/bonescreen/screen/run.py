"""``screen()``: the resumable run over files, folders and manifests.

Pipeline, built so memory stays flat over any number of images:

    lazy file walk -> small thread pool (ScreeningEngine.prepare: header gate,
    decode, pixel gate, preprocess; bounded number in flight) -> batches ->
    ScreeningEngine.run_batch (model(s), OOD check, decision) -> journal

Rows go to ``results.jsonl`` (the journal) and ``results.csv`` after every
batch, flushed and fsync'ed. A re-run over the same output folder reads the
journal, drops a partially written last line, rewrites the CSV, and skips
every image that already has a row. ``predictions.csv``, ``studies.csv``
(and the per-study SRs) and ``summary.json`` are rewritten at the end of each
run from the whole journal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bonescreen.fsio import atomic_write_json
from bonescreen.pseudonym import Pseudonymiser, key_fingerprint, load_or_create_key
from bonescreen.schema import OOD_POLICIES
from bonescreen.screen.engine import Prepared, ScreeningEngine
from bonescreen.screen.inputs import ClinicalTable, count_inputs, iter_inputs
from bonescreen.screen.journal import ResultStore
from bonescreen.screen.loading import load_models
from bonescreen.screen.models import ModelSet, ScreenError
from bonescreen.screen.outputs import sr_facts, write_image_files, write_parquet, write_predictions, write_studies
from bonescreen.tasks import mode_task

__all__ = ["RunState", "ScreenOptions", "ScreenSummary", "finish_run", "open_run", "result_columns", "screen"]

log = logging.getLogger(__name__)


def result_columns(mode: str) -> list[str]:
    """The results-table columns of a run in ``mode`` (``ModelSet.mode``): its task's, from ``bonescreen.schema``."""
    return mode_task(mode).result_columns()


@dataclass
class ScreenOptions:
    batch_size: int = 8
    workers: int = 2
    threshold: float | None = None  # None: the artifact's
    threshold_stage1: float | None = None
    always_stage2: bool = False
    explain: bool = False
    dicom_sr: bool = False  # one SR per study
    dicom_sc: bool = False
    site: str | None = None
    include_patient_id: bool = False
    # HMAC key for patient pseudonyms (bonescreen.pseudonym); None: $BONESCREEN_PSEUDONYM_KEY_FILE
    # or the per-user default, generated on first use
    pseudonym_key_file: str | os.PathLike[str] | None = None
    labels: str | os.PathLike[str] | None = None
    progress: bool = True
    overwrite: bool = False
    gate: dict[str, Any] = field(default_factory=dict)  # GatePolicy overrides
    clinical: str | os.PathLike[str] | None = None  # pediatric: height/weight CSV (ClinicalTable)
    ood: str = "refuse"  # refuse | flag | off (schema.OOD_POLICIES)
    device: str = "cpu"  # cpu | cuda | auto (bonescreen.screen.backends.resolve_device)
    compile: bool = False  # torch backends: torch.compile (opt-in)
    calibration: Sequence[str] | None = None  # int8 backends / auto: calibration inputs
    write_parquet: bool = False  # also OUT/parquet/part-*.parquet (the Ray engine always writes them)
    site_profile: str | None = None  # a site profile in the model artifact (bonescreen.adapt)


@dataclass
class ScreenSummary:
    out_dir: str
    n_rows: int = 0
    n_screened: int = 0
    n_skipped: int = 0
    n_flagged: int = 0
    n_new: int = 0
    n_resumed: int = 0
    n_studies: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    model: str = ""
    model_stage1: str = ""
    backend: str = ""
    mode: str = ""
    ood: str = ""
    site_profile: str | None = None

    def text(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        cats = ", ".join(f"{k}={v}" for k, v in sorted(self.categories.items()))
        s = (f"{self.n_rows} images in {self.n_studies} studies: {self.n_screened} screened ({cats or 'none'}), "
             f"{self.n_flagged} flagged, {self.n_skipped} skipped")
        if reasons:
            s += f" [{reasons}]"
        if self.site_profile:
            s += f"; site profile {self.site_profile}"
        if self.ood == "off":
            s += "; OUT-OF-DISTRIBUTION CHECK OFF (--ood off)"
        if self.n_resumed:
            s += f"; {self.n_resumed} rows kept from an earlier run"
        s += f"; {self.n_new} new in {self.seconds:.1f} s"
        return s + f"; results in {self.out_dir}"


class _Tally:
    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.ids: set[str] = set()  # image ids (SOP Instance UIDs) with a row
        self.reasons: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.screened = self.skipped = self.flagged = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self.paths.add(os.path.realpath(row["path"]))
        if row.get("image_id"):
            self.ids.add(str(row["image_id"]))
        if row.get("eligible"):
            self.screened += 1
            self.categories[str(row.get("category"))] += 1
            self.flagged += bool(row.get("flag"))
            if row.get("reason"):  # eligible with a reason: flagged out-of-distribution (--ood flag)
                self.reasons[str(row["reason"])] += 1
        else:
            self.skipped += 1
            self.reasons[str(row.get("reason"))] += 1


def _check_resume(out: Path, config: dict[str, Any], overwrite: bool, info: dict[str, Any] | None = None) -> None:
    """Refuse a folder whose results came from other settings; record ``config`` (+ ``info``) in run.json.

    ``info`` (the backend and how ``auto`` chose it, the engine) is recorded, not compared: rows
    carry their own ``backend``, and fp32 backends agree within 1e-4.
    """
    run_json = out / "run.json"
    journal = out / "results.jsonl"
    if overwrite:
        for f in (journal, out / "results.csv", out / "predictions.csv", out / "studies.csv", out / "summary.json",
                  run_json):
            f.unlink(missing_ok=True)
        for f in (out / "parquet").glob("part-*.parquet"):
            f.unlink()
    elif run_json.is_file() and journal.is_file():
        old = json.loads(run_json.read_text())
        diff = sorted(k for k in config if old.get(k) != config[k])
        if diff:
            raise ScreenError(
                f"{out} holds results from a run with different settings ({', '.join(diff)}); "
                "pass --overwrite to start again or use another --out folder"
            )
    atomic_write_json(run_json, {**config, **(info or {})})


@dataclass
class RunState:
    """A run opened by :func:`open_run`: what every runner (single process, Ray) shares."""

    out: Path
    opts: ScreenOptions
    models: ModelSet
    engine: ScreeningEngine
    store: ResultStore
    tally: _Tally
    n_resumed: int
    exclude: list[str]


def engine_policy(opts: ScreenOptions) -> dict[str, Any]:
    """The options that decide (thresholds, gate, OOD policy, site, site profile): one list for every
    runner, so ``screen``'s engine and the Ray actors' engines decide alike."""
    return {"threshold": opts.threshold, "threshold_stage1": opts.threshold_stage1,
            "always_stage2": opts.always_stage2, "gate": opts.gate, "ood": opts.ood, "site": opts.site,
            "include_patient_id": opts.include_patient_id, "site_profile": opts.site_profile}


def open_run(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str] | ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    stage1: str | os.PathLike[str] | None = None,
    backend: str = "torch",
    threads: int | None = None,
    options: ScreenOptions | None = None,
    info: dict[str, Any] | None = None,
) -> RunState:
    """Check options, load the model(s) and the engine, check/record run.json, recover the journal."""
    opts = options or ScreenOptions()
    if opts.ood not in OOD_POLICIES:
        raise ScreenError(f"--ood must be one of {', '.join(OOD_POLICIES)}; got {opts.ood!r}")
    if opts.batch_size < 1 or opts.workers < 1:
        raise ScreenError("batch size and workers must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = model if isinstance(model, ModelSet) else load_models(
        model, stage1, backend=backend, threads=threads, cache_dir=out / ".onnx", device=opts.device,
        compile=opts.compile, calibration=opts.calibration, batch_size=opts.batch_size,
    )
    clinical = ClinicalTable(opts.clinical) if opts.clinical else None
    pseudonymiser = key_id = None
    if not opts.include_patient_id:
        key = load_or_create_key(opts.pseudonym_key_file)
        pseudonymiser, key_id = Pseudonymiser(key), key_fingerprint(key)
    engine = ScreeningEngine(models, explain=opts.explain or opts.dicom_sc, pseudonymiser=pseudonymiser,
                             clinical=clinical, **engine_policy(opts))
    if opts.ood == "off":
        log.warning("the out-of-distribution check is off (--ood off): images unlike the training data are "
                    "scored as if they were chest radiographs; every row records ood_check=off")
    # which key made the pseudonyms (a fingerprint, not the key): a resumed run must not mix two
    recorded = {"backend": models.backend, "backend_choice": models.choice, **(info or {})}
    _check_resume(out, {"pseudonym_key": key_id, **engine.run_config()}, opts.overwrite, recorded)

    store = ResultStore(out, result_columns(models.mode))
    tally = _Tally()
    n_resumed = store.recover(tally.add)
    if n_resumed:
        log.info("resuming: %d image(s) already have a row in %s", n_resumed, store.jsonl)
        # inputs are skipped by path before they are read, and by image id (SOP Instance UID)
        # after the header: a re-exported archive is not screened twice
        engine.ctx = replace(engine.ctx, finished=frozenset(tally.ids))
    return RunState(out, opts, models, engine, store, tally, n_resumed, [str(out)])


def finish_run(run: RunState, n_new: int, seconds: float, *, backend: str | None = None) -> ScreenSummary:
    """predictions.csv, studies.csv (+ SRs), Parquet shards (when asked) and summary.json, from the journal."""
    opts, out, models, tally = run.opts, run.out, run.models, run.tally
    n_pred = write_predictions(run.store, out / "predictions.csv", opts.labels, mode=models.mode)
    n_studies = write_studies(run.store, out, sr=opts.dicom_sr, run=sr_facts(run.engine), mode=models.mode)
    if opts.write_parquet:
        write_parquet(run.store, out / "parquet")
    summary = ScreenSummary(
        out_dir=str(out), n_rows=tally.screened + tally.skipped, n_screened=tally.screened,
        n_skipped=tally.skipped, n_flagged=tally.flagged, n_new=n_new, n_resumed=run.n_resumed, n_studies=n_studies,
        reasons=dict(tally.reasons), categories=dict(tally.categories), seconds=round(seconds, 3),
        images_per_s=round(n_new / seconds, 3) if seconds > 0 else 0.0, model=models.main_id,
        model_stage1=models.stage1_id, backend=backend or models.backend, mode=models.mode, ood=opts.ood,
        site_profile=opts.site_profile,
    )
    atomic_write_json(out / "summary.json", {**summary.__dict__, "n_predictions": n_pred})
    return summary


def screen(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str] | ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    stage1: str | os.PathLike[str] | None = None,
    backend: str = "torch",
    threads: int | None = None,
    options: ScreenOptions | None = None,
) -> ScreenSummary:
    """Screen every image under ``inputs``; results in ``out_dir`` (see module docstring)."""
    from tqdm.auto import tqdm

    run = open_run(inputs, model, out_dir, stage1=stage1, backend=backend, threads=threads, options=options,
                   info={"engine": "local"})
    opts, out, models, engine, store, tally = run.opts, run.out, run.models, run.engine, run.store, run.tally
    exclude = run.exclude
    total = count_inputs(inputs, exclude=exclude)
    bar = tqdm(total=total, unit="img", desc="screen", disable=not opts.progress)
    bar.update(min(total, len(tally.paths)))
    start = time.perf_counter()
    n_new = 0
    pending_rows: list[dict[str, Any]] = []
    batch: list[Prepared] = []
    store.open()

    def flush_rows() -> None:
        store.append(pending_rows)
        for r in pending_rows:
            tally.add(r)
        bar.update(len(pending_rows))
        pending_rows.clear()

    def run_batch() -> None:
        if not batch:
            return
        engine.run_batch(batch)
        if engine.explainers:
            scored = [b for b in batch if b.row.get("eligible")]
            write_image_files([b.row for b in scored], engine.overlays(scored), out, png=opts.explain,
                              sc=opts.dicom_sc, model_id=models.main_id)
        for b in batch:
            pending_rows.append(b.row)
            b.images = None
        batch.clear()
        flush_rows()

    todo = (it for it in iter_inputs(inputs, exclude=exclude) if os.path.realpath(it.path) not in tally.paths)
    window = max(2 * opts.workers, opts.batch_size)
    try:
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="screen-prep") as pool:
            inflight: deque[Future[Prepared]] = deque()
            exhausted = False
            while True:
                while not exhausted and len(inflight) < window:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    inflight.append(pool.submit(engine.prepare, item))
                if not inflight:
                    break
                prep = inflight.popleft().result()
                n_new += 1
                if prep.images is None:
                    pending_rows.append(prep.row)
                    if len(pending_rows) >= opts.batch_size:
                        flush_rows()
                else:
                    batch.append(prep)
                    if len(batch) >= opts.batch_size:
                        run_batch()
            run_batch()
            flush_rows()
    finally:
        store.close()
        bar.close()

    return finish_run(run, n_new, time.perf_counter() - start)
