"""``screen --engine ray``: a local Ray Data pipeline over the same engine gives the single-process results,
resumes a killed run with every image exactly once, and writes the same outputs (plus Parquet shards).

Ray is started once for the module (2 logical CPUs, no dashboard, bound to 127.0.0.1); the
killed run is a second driver process that joins that cluster with ``--ray-address``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from _screen_helpers import make_artifact, radiograph

from bonescreen.screen import ScreenOptions, screen

N_IMAGES = 14


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    from bonescreen.screen.ray_run import init_ray

    started = init_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import build_dicom

    d = tmp_path_factory.mktemp("ray")
    folder = d / "in"
    folder.mkdir()
    for i in range(N_IMAGES):
        # two images per study: the study roll-up has something to decide
        ds = build_dicom(radiograph(i), PatientID=f"P{i // 2}", StudyInstanceUID=f"1.2.3.{i // 2}")
        ds.save_as(folder / f"img{i:03d}.dcm", enforce_file_format=True)
    ds = build_dicom(radiograph(99), ViewPosition="LL")  # refused by the gate: a lateral view
    ds.save_as(folder / "lateral.dcm", enforce_file_format=True)
    (folder / "junk.dcm").write_text("not a dicom")
    return folder, make_artifact(d / "m.pt", "stage2")


def _rows(path: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, path.read_text().splitlines())}


def test_ray_engine_equals_single_process(ray_cluster: str, data: tuple[Path, Path], tmp_path: Path) -> None:
    from bonescreen.screen.ray_run import ray_screen

    folder, model = data
    opts = ScreenOptions(batch_size=4, progress=False)
    local = screen([folder], model, tmp_path / "local", options=opts)
    dist = ray_screen([folder], model, tmp_path / "ray", options=opts, ray_workers=2)
    a, b = _rows(tmp_path / "local" / "results.jsonl"), _rows(tmp_path / "ray" / "results.jsonl")
    assert set(a) == set(b) and len(a) == N_IMAGES + 2
    assert local.n_screened == dist.n_screened == N_IMAGES
    assert dist.reasons == local.reasons == {"lateral_view": 1, "not_dicom": 1}
    for name, ra in a.items():
        rb = b[name]
        for col in ra:
            if col in ("score", "score_stage2", "ood_score"):
                if ra[col] is None:
                    assert rb[col] is None, (name, col)
                else:
                    assert abs(ra[col] - rb[col]) <= 1e-6, (name, col, ra[col], rb[col])
            else:
                assert ra[col] == rb[col], (name, col, ra[col], rb[col])
    # the same study table, and run.json says which engine ran
    with open(tmp_path / "local" / "studies.csv") as fa, open(tmp_path / "ray" / "studies.csv") as fb:
        sa = {r["study_instance_uid"]: r for r in csv.DictReader(fa)}
        sb = {r["study_instance_uid"]: r for r in csv.DictReader(fb)}
    assert set(sa) == set(sb) and len(sa) >= N_IMAGES // 2
    assert all(sa[k]["decided_by"] == sb[k]["decided_by"] and sa[k]["category"] == sb[k]["category"] for k in sa)
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["engine"] == "ray"
    # Parquet shards: the journal's rows, typed
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ray" / "parquet")
    assert table.num_rows == N_IMAGES + 2
    assert str(table.schema.field("score").type) == "double" and str(table.schema.field("eligible").type) == "bool"


CHILD = r"""
import sys, time
from bonescreen.screen import ResultStore
from bonescreen.screen.ray_run import ray_screen
from bonescreen.screen import ScreenOptions
real = ResultStore.append
def slow(self, rows):  # the driver journals slowly, so the parent can kill it midway
    real(self, rows)
    time.sleep(0.4)
ResultStore.append = slow
ray_screen([sys.argv[1]], sys.argv[2], sys.argv[3], options=ScreenOptions(batch_size=1, progress=False),
           ray_address=sys.argv[4])
"""


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_killed_ray_run_resumes_every_image_once(ray_cluster: str, data: tuple[Path, Path], tmp_path: Path) -> None:
    from bonescreen.screen.ray_run import ray_screen

    folder, model = data
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(model), str(out), ray_cluster], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "results.jsonl"
    deadline = time.time() + 120
    try:
        while _lines(journal) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.time() < deadline, "the Ray driver made no progress"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _lines(journal)
    assert 4 <= done < N_IMAGES + 2, "the driver must be killed midway"
    before = journal.read_text().splitlines()

    s = ray_screen([folder], model, out, options=ScreenOptions(batch_size=4, progress=False), ray_workers=1)
    rows = [json.loads(x) for x in journal.read_text().splitlines()]
    names = [Path(r["path"]).name for r in rows]
    assert len(names) == len(set(names)) == N_IMAGES + 2  # every input exactly once
    assert journal.read_text().splitlines()[: len(before)] == before  # finished rows kept as they were
    assert s.n_resumed == done and s.n_new == N_IMAGES + 2 - done
    assert s.n_screened == N_IMAGES
    # a third run has nothing left to do
    again = ray_screen([folder], model, out, options=ScreenOptions(batch_size=4, progress=False))
    assert again.n_new == 0 and _lines(journal) == N_IMAGES + 2


def test_resume_skips_finished_sop_instance_uids(ray_cluster: str, data: tuple[Path, Path], tmp_path: Path) -> None:
    """A re-run that finds a finished image at another path (a re-export) gives it an already_screened row
    instead of a second score; a new image is screened. Ray and single-process agree."""
    import shutil

    from conftest import build_dicom

    from bonescreen.screen.ray_run import ray_screen

    folder, model = data
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(folder / "img003.dcm", extra / "re-export.dcm")
    build_dicom(radiograph(500), PatientID="P500").save_as(extra / "new.dcm", enforce_file_format=True)
    opts = ScreenOptions(batch_size=4, progress=False)
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine

        def run(inputs: list[Path], engine: str = engine, out: Path = out) -> Any:
            if engine == "ray":
                return ray_screen(inputs, model, out, options=opts, ray_workers=1)
            return screen(inputs, model, out, options=opts)

        run([folder])
        s = run([folder, extra])
        assert s.n_resumed == N_IMAGES + 2 and s.n_new == 2
        rows = _rows(out / "results.jsonl")
        assert rows["re-export.dcm"]["reason"] == "already_screened"
        assert rows["re-export.dcm"]["image_id"] == rows["img003.dcm"]["image_id"]
        assert rows["re-export.dcm"]["score"] is None and rows["re-export.dcm"]["eligible"] is False
        assert rows["new.dcm"]["eligible"] is True
        outs[engine] = rows
    assert outs["local"]["new.dcm"]["score"] == pytest.approx(outs["ray"]["new.dcm"]["score"], abs=1e-6)
