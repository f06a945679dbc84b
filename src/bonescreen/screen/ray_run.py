"""``screen --engine ray``: the same screening engine as a Ray Data pipeline.

::

    driver: list inputs (folders, manifests, file lists; lazily, in chunks), drop finished ones
      -> CPU tasks: ScreeningEngine's prepare (header gate, decode, pixel gate, preprocess)
      -> actor pool: ScreeningEngine.run_batch (backend: probabilities + features -> OOD -> decide),
         one GPU per actor when the cluster has GPUs, CPU actors otherwise
      -> driver: the same journal (results.jsonl/results.csv, fsync'ed per block), then
         predictions.csv, studies.csv (+ per-study SRs), Parquet shards and summary.json

Nothing about a row is decided outside :class:`bonescreen.screen.engine.ScreeningEngine`
(gate, decision, schema are the single-process ones), so results equal ``screen``'s
(tests/test_screen_ray.py). Resume works as in ``screen``: the journal is the source of
truth and a re-run skips every input that has a row. Memory stays flat in the number of
inputs: the listing is consumed in chunks of :data:`CHUNK` inputs, each one Ray dataset
of small blocks that streams through bounded queues.

Local by default (``ray.init`` with a fixed, small number of CPUs, no dashboard, no usage
statistics, bound to 127.0.0.1); ``ray_address`` joins a running cluster (``ray start
--head`` ...; README "Screening on a Ray cluster"). The pseudonym key travels as a file
path (shared storage), never through Ray's object store.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from bonescreen.screen.engine import PrepContext, Prepared, ScreeningEngine, prepare
from bonescreen.screen.gate import GatePolicy
from bonescreen.screen.inputs import ClinicalTable, InputItem, count_inputs, iter_inputs
from bonescreen.screen.loading import backend_label, calibration_for, load_models
from bonescreen.screen.models import ScreenError
from bonescreen.screen.run import ScreenOptions, ScreenSummary, engine_policy, finish_run, open_run

__all__ = ["ACTOR_MEMORY", "CHUNK", "PrepSpec", "init_ray", "ray_screen"]

log = logging.getLogger(__name__)

#: Inputs per Ray dataset: the listing is consumed this many at a time (flat memory).
CHUNK = 20_000
#: Memory a predict actor reserves besides twice its model file(s) (weights + a batch's activations).
ACTOR_MEMORY = 512 * 1024 * 1024


@dataclass(frozen=True)
class PrepSpec:
    """What a CPU task needs to rebuild :class:`PrepContext` (picklable; the key stays a file path)."""

    policy: GatePolicy
    sizes: tuple[int, ...]
    site: str | None
    include_patient_id: bool
    pseudonym_key_file: str | None
    key_fingerprint: str | None  # the driver's key: a worker that loads another one refuses to run
    pediatric: bool
    clinical: str | None


_PREP_CACHE: dict[PrepSpec, PrepContext] = {}


def _prep_context(spec: PrepSpec) -> PrepContext:
    ctx = _PREP_CACHE.get(spec)
    if ctx is None:
        from bonescreen.pseudonym import Pseudonymiser, key_fingerprint, load_or_create_key

        pseud = None
        if not spec.include_patient_id:
            key = load_or_create_key(spec.pseudonym_key_file)
            if key_fingerprint(key) != spec.key_fingerprint:
                raise ScreenError("this Ray worker reads another pseudonym key than the driver: give every node "
                                  "the same key file (--pseudonym-key-file on shared storage)")
            pseud = Pseudonymiser(key)
        clinical = ClinicalTable(spec.clinical) if spec.clinical else None
        ctx = _PREP_CACHE[spec] = PrepContext(spec.policy, spec.sizes, spec.site, spec.include_patient_id, pseud,
                                              pediatric=spec.pediatric, clinical=clinical)
    return ctx


def _encode(preps: Sequence[Prepared], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Prepared rows as a numpy batch: JSON rows, one uint8 tensor column per input size."""
    out: dict[str, np.ndarray] = {
        "row": np.array([json.dumps(p.row, default=str) for p in preps], dtype=object),
        "clinical": np.array([json.dumps(p.clinical) if p.clinical is not None else "" for p in preps], dtype=object),
        "has_image": np.array([p.images is not None for p in preps], dtype=bool),
    }
    for s in sizes:
        arr = np.zeros((len(preps), s, s), dtype=np.uint8)
        for i, p in enumerate(preps):
            if p.images is not None:
                arr[i] = p.images[s]
        out[f"img{s}"] = arr
    return out


def _decode(batch: dict[str, np.ndarray], sizes: Sequence[int]) -> list[Prepared]:
    preps = []
    for i in range(len(batch["row"])):
        row = json.loads(batch["row"][i])
        images = {s: np.asarray(batch[f"img{s}"][i]) for s in sizes} if bool(batch["has_image"][i]) else None
        clin = json.loads(batch["clinical"][i]) if batch["clinical"][i] else None
        preps.append(Prepared(row, images, clin))
    return preps


def prepare_batch(batch: dict[str, np.ndarray], spec: PrepSpec,
                  finished: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """CPU task: gate, decode and preprocess a block of inputs (never raises for a bad file).

    ``finished``: image ids (SOP Instance UIDs) an earlier run journaled (skipped, as in ``screen``).
    """
    ctx = replace(_prep_context(spec), finished=finished)
    preps = [prepare(InputItem(str(p), json.loads(e) if e else {}), ctx) for p, e in zip(batch["path"], batch["extra"])]
    return _encode(preps, spec.sizes)


class PredictActor:
    """One model replica: the engine's run_batch on prepared rows (refused rows pass through)."""

    def __init__(self, model: str, stage1: str | None, backend: str, load: dict[str, Any],
                 engine: dict[str, Any], sizes: tuple[int, ...], out: str, explain: bool, dicom_sc: bool) -> None:
        models = load_models(model, stage1, backend=backend, **load)
        self.engine = ScreeningEngine(models, explain=explain or dicom_sc, **engine)
        self.sizes = sizes
        self.out = Path(out)
        self.png, self.sc = explain, dicom_sc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from bonescreen.screen.outputs import write_image_files

        preps = _decode(batch, self.sizes)
        eligible = [p for p in preps if p.images is not None]
        self.engine.run_batch(eligible)
        if self.engine.explainers:
            scored = [p for p in eligible if p.row.get("eligible")]
            write_image_files([p.row for p in scored], self.engine.overlays(scored), self.out, png=self.png,
                              sc=self.sc, model_id=self.engine.models.main_id)
        common = self.engine.common
        for p in preps:
            if p.images is None:
                p.row.update(common)
        return {"row": np.array([json.dumps(p.row, default=str) for p in preps], dtype=object)}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (``auto`` or ``HOST:PORT``) or start a private local Ray; True if started here.

    Local Ray: ``num_cpus`` logical CPUs, no dashboard, no usage statistics, bound to
    127.0.0.1, its own temporary folder, worker logs kept off the terminal.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read when ray starts: nothing reaches the network
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1", object_store_memory=256 * 1024 * 1024)
    return True


def _chunks(items: Iterator[InputItem], n: int) -> Iterator[list[InputItem]]:
    while chunk := list(islice(items, n)):
        yield chunk


@dataclass
class _RayPlan:
    """Where the replicas run and what they load: decided once on the driver, so every actor agrees."""

    device: str
    workers: int
    backend: str
    label: str
    actor_threads: int | None
    choice: Any = None


def _plan(ray: Any, model: str | os.PathLike[str], stage1: str | os.PathLike[str] | None, backend: str,
          threads: int | None, opts: ScreenOptions, ray_workers: int | None, ray_address: str | None,
          out_dir: str | os.PathLike[str]) -> _RayPlan:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if opts.device == "cuda" and not gpus:
        raise ScreenError("--device cuda: the Ray cluster has no GPU")
    device = "cuda" if gpus and opts.device in ("auto", "cuda") else "cpu"
    workers = gpus if ray_workers is None and device == "cuda" else (ray_workers or 1)
    # torch/onnxruntime/OpenVINO threads per actor: this machine's cores shared by the local actors
    actor_threads = threads or (max(1, (os.cpu_count() or 1) // workers) if not ray_address else None)
    choice = None
    if backend == "auto" and device == "cpu":
        # probed once here (where the command runs), so every actor loads the same backend
        from bonescreen.screen.auto import choose_backend

        choice = choose_backend(model, stage1, threads=actor_threads, cache_dir=Path(out_dir) / ".onnx",
                                device="cpu", calibration=calibration_for(model, opts.calibration),
                                batch_size=opts.batch_size)
        backend = choice.backend
    label = backend_label(backend, device, opts.compile) if backend != "auto" else f"auto@{device}"
    return _RayPlan(device, workers, backend, label, actor_threads, choice)


@dataclass
class _Pipeline:
    """One chunk of inputs as a Ray Data pipeline: decode/preprocess tasks, then the predict actors."""

    spec: PrepSpec
    finished: Any
    plan: _RayPlan
    opts: ScreenOptions
    actor_kwargs: dict[str, Any]
    actor_memory: int

    def dataset(self, ray: Any, items: list[InputItem]) -> Any:
        opts = self.opts
        ds = ray.data.from_items(
            [{"path": it.path, "extra": json.dumps(it.extra) if it.extra else ""} for it in items],
            override_num_blocks=max(1, -(-len(items) // opts.batch_size)),
        )
        ds = ds.map_batches(prepare_batch, fn_kwargs={"spec": self.spec, "finished": self.finished},
                            batch_size=opts.batch_size, batch_format="numpy", num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=opts.workers))
        return ds.map_batches(
            PredictActor, batch_size=opts.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.plan.workers), num_cpus=1,
            num_gpus=1 if self.plan.device == "cuda" else 0, memory=self.actor_memory,
            fn_constructor_kwargs=self.actor_kwargs,
        )


def _pipeline(run: Any, model: str | os.PathLike[str], stage1: str | os.PathLike[str] | None, plan: _RayPlan,
              opts: ScreenOptions, out_dir: str | os.PathLike[str]) -> _Pipeline:
    engine = run.engine
    key_file = str(Path(opts.pseudonym_key_file).resolve()) if opts.pseudonym_key_file else None
    key_fp = json.loads((run.out / "run.json").read_text()).get("pseudonym_key")
    spec = PrepSpec(engine.policy, engine.ctx.sizes, opts.site, opts.include_patient_id, key_file, key_fp,
                    engine.ctx.pediatric, str(opts.clinical) if opts.clinical else None)
    load_kw = {"threads": plan.actor_threads, "cache_dir": str(Path(out_dir).resolve() / ".onnx"),
               "device": plan.device, "compile": opts.compile, "calibration": opts.calibration,
               "batch_size": opts.batch_size}
    actor_kwargs = {"model": str(Path(model).resolve()), "stage1": str(Path(stage1).resolve()) if stage1 else None,
                    "backend": plan.backend, "load": load_kw, "engine": engine_policy(opts), "sizes": spec.sizes,
                    "out": str(Path(out_dir).resolve()), "explain": opts.explain, "dicom_sc": opts.dicom_sc}
    # decode/preprocess tasks and predict actors must stay separate operators (CPU tasks scale with
    # --workers, replicas with --ray-workers); Ray fuses a task map into the next actor map when their
    # resource requests are equal, so an actor also reserves the memory a model replica needs
    actor_memory = ACTOR_MEMORY + 2 * sum(Path(p).stat().st_size for p in (model, stage1) if p)
    # the ids an earlier run screened: Ray ships fn_kwargs to the tasks once (object store)
    return _Pipeline(spec, engine.ctx.finished, plan, opts, actor_kwargs, actor_memory)


def _stream(ray: Any, run: Any, inputs: Sequence[str | os.PathLike[str]], pipe: _Pipeline,
            chunk: int) -> tuple[int, float]:
    """Screen what an earlier run did not, chunk by chunk, each result stored as it comes back:
    (images screened now, seconds spent screening them, the first counting pass not included)."""
    from tqdm.auto import tqdm

    workers = pipe.plan.workers
    total = count_inputs(inputs, exclude=run.exclude)
    bar = tqdm(total=total, unit="img", desc=f"screen (ray, {workers} worker{'s' * (workers > 1)})",
               disable=not pipe.opts.progress)
    bar.update(min(total, len(run.tally.paths)))
    todo = (it for it in iter_inputs(inputs, exclude=run.exclude) if os.path.realpath(it.path) not in run.tally.paths)
    start = time.perf_counter()
    n_new = 0
    run.store.open()
    try:
        for items in _chunks(todo, chunk):
            for batch in pipe.dataset(ray, items).iter_batches(batch_size=None, batch_format="numpy"):
                rows = [json.loads(r) for r in batch["row"]]
                run.store.append(rows)
                for r in rows:
                    run.tally.add(r)
                n_new += len(rows)
                bar.update(len(rows))
    finally:
        run.store.close()
        bar.close()
    return n_new, time.perf_counter() - start


def ray_screen(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    stage1: str | os.PathLike[str] | None = None,
    backend: str = "torch",
    threads: int | None = None,
    options: ScreenOptions | None = None,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    chunk: int = CHUNK,
) -> ScreenSummary:
    """Screen ``inputs`` on Ray; same outputs (plus ``OUT/parquet/``) and resume rules as :func:`screen`."""
    opts = replace(options or ScreenOptions(), write_parquet=True)
    if ray_workers is not None and ray_workers < 1:
        raise ScreenError("--ray-workers must be at least 1")
    if isinstance(model, (list, tuple)) or not isinstance(model, (str, os.PathLike)):
        raise ScreenError("the Ray engine loads the model from its path (every worker opens it)")
    started = init_ray(ray_address, num_cpus=(ray_workers or 1) + opts.workers if not ray_address else None)
    import ray
    import ray.data

    try:
        plan = _plan(ray, model, stage1, backend, threads, opts, ray_workers, ray_address, out_dir)
        # the driver needs the artifact's facts (gate, thresholds, OOD parts) only: plain torch on the CPU
        driver_models = load_models(model, stage1, backend="torch")
        driver_models.choice = plan.choice.as_dict() if plan.choice is not None else None
        driver_models.backend = plan.label
        run = open_run(inputs, driver_models, out_dir, options=replace(opts, explain=False, dicom_sc=False),
                       info={"engine": "ray", "ray_workers": plan.workers, "device": plan.device})
        run.opts = opts  # SRs, labels, Parquet: the caller's options
        pipe = _pipeline(run, model, stage1, plan, opts, out_dir)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        n_new, seconds = _stream(ray, run, inputs, pipe, chunk)
        return finish_run(run, n_new, seconds, backend=plan.label)
    finally:
        if started:
            ray.shutdown()
