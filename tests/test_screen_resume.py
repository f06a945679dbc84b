"""Resumable, kill-safe screening: a SIGKILL'd run restarted loses no finished row and duplicates none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _screen_helpers import make_artifact, radiograph

from bonescreen.screen import ResultStore, ScreenError, ScreenOptions, screen

N_IMAGES = 24

# Run in a child process: every batch is slowed down so the parent can kill it midway.
CHILD = r"""
import sys, time
from bonescreen.artifact import LoadedModel
from bonescreen.screen import ScreenOptions, screen
real = LoadedModel.predict_proba
def slow(self, *a, **k):
    time.sleep(0.3)
    return real(self, *a, **k)
LoadedModel.predict_proba = slow
screen([sys.argv[1]], sys.argv[2], sys.argv[3], options=ScreenOptions(batch_size=2, workers=1, progress=False))
"""


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.fixture()
def folder(tmp_path: Path, write_dicom) -> Path:  # type: ignore[no-untyped-def]
    for i in range(N_IMAGES):
        write_dicom(radiograph(i), name=f"in/img{i:03d}.dcm")
    (tmp_path / "in" / "junk.dcm").write_text("junk")
    return tmp_path / "in"


def test_sigkill_midway_then_restart_gives_one_row_per_image(tmp_path: Path, folder: Path) -> None:
    model = make_artifact(tmp_path / "m.pt", "stage2")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(model), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "results.jsonl"
    deadline = time.time() + 90
    try:
        while _count_lines(journal) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.time() < deadline, "child made no progress"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = _count_lines(journal)
    assert 6 <= done_before < N_IMAGES + 1, "the child must be killed midway"
    before = [json.loads(x) for x in journal.read_text().splitlines()]
    # a torn write: the kill landed in the middle of a row
    with open(journal, "a") as fh:
        fh.write('{"path": "' + str(folder / "img999.dcm") + '", "eligi')

    s = screen([folder], model, out, options=ScreenOptions(batch_size=4, progress=False))
    rows = [json.loads(x) for x in journal.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == N_IMAGES + 1
    assert {Path(p).name for p in paths} == {f"img{i:03d}.dcm" for i in range(N_IMAGES)} | {"junk.dcm"}
    assert rows[: len(before)] == before  # finished rows are kept as they were
    assert s.n_resumed == done_before and s.n_new == N_IMAGES + 1 - done_before
    assert s.n_screened == N_IMAGES and s.reasons == {"not_dicom": 1}
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == N_IMAGES + 2  # header + one per image: the CSV was rebuilt from the journal


def test_rerun_skips_finished_and_refuses_other_settings(tmp_path: Path, folder: Path) -> None:
    model = make_artifact(tmp_path / "m.pt", "stage2")
    out = tmp_path / "out"
    first = screen([folder], model, out, options=ScreenOptions(progress=False))
    again = screen([folder], model, out, options=ScreenOptions(progress=False))
    assert first.n_new == N_IMAGES + 1 and again.n_new == 0 and again.n_rows == N_IMAGES + 1
    assert _count_lines(out / "results.jsonl") == N_IMAGES + 1
    other = make_artifact(tmp_path / "other.pt", "stage2", seed=7)
    with pytest.raises(ScreenError, match="different settings"):
        screen([folder], other, out, options=ScreenOptions(progress=False))
    with pytest.raises(ScreenError, match="different settings"):
        screen([folder], model, out, options=ScreenOptions(progress=False, threshold=0.3))
    s = screen([folder], other, out, options=ScreenOptions(progress=False, overwrite=True))
    assert s.n_resumed == 0 and s.n_new == N_IMAGES + 1


def test_recover_drops_only_the_torn_line(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.dir.mkdir(exist_ok=True)
    good = [{"path": f"/x/{i}", "eligible": True} for i in range(3)]
    store.jsonl.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"path": "/x/3", "elig')
    seen: list[str] = []
    assert store.recover(lambda r: seen.append(r["path"])) == 3
    assert seen == ["/x/0", "/x/1", "/x/2"]
    assert store.jsonl.read_text().endswith("}\n")
    assert len(store.csv.read_text().splitlines()) == 4
