"""Two ``serve`` worker processes on one PostgreSQL queue; ``kill -9`` of one: every image still gets one result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from _service_support import free_port, make_cxr_dataset, make_tiny_artifact, reset_database

TOKEN = "two-workers-token"
N = 30


def _get(port: int, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _spawn(args: list[str], log: Path, **env_extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "bonescreen", "serve", *args], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, env=env)


def _wait(cond: Any, what: str, timeout: float, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None and p.returncode != -signal.SIGKILL:
                raise AssertionError(f"serve exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            got = cond()
            if got:
                return got
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s:\n" + "\n".join(log.read_text()[-1500:] for log in logs))


def test_two_worker_processes_share_the_queue_and_survive_kill_9(pg_server_url: str, tmp_path: Path) -> None:
    from pynetdicom import AE

    from bonescreen.service.store import Store

    reset_database(pg_server_url)
    art = make_tiny_artifact(tmp_path / "tiny.pt", size=32, min_size=32)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    http_port, dicom_port = free_port(), free_port()
    common = ["--model", str(art), "--data-dir", str(tmp_path / "data"), "--db-url", pg_server_url,
              "--batch-size", "2", "--no-explain", "--no-sr", "--lease-seconds", "4", "--debug-worker-delay", "0.4"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = _spawn([*common, "--instance", "node-a", "--port", str(http_port), "--dicom-port", str(dicom_port),
                "--dicom-host", "127.0.0.1", "--allow-ae", "MODALITY", "--token-file", str(token_file)], logs[0],
               BONESCREEN_SERVE__TOKEN_ROLE="admin")  # settings from the environment too
    b = _spawn([*common, "--instance", "node-b", "--worker-only"], logs[1])
    procs = [a, b]
    try:
        def both_up() -> bool:
            inst = {i["name"]: i for i in _get(http_port, "/api/v1/instances")["instances"]}
            return {"node-a", "node-b"} <= set(inst) and all(inst[n]["heartbeat_age_s"] < 5 for n in inst)

        _wait(both_up, "both instances registered", 120, procs, logs)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title="BONESCREEN")
        assert assoc.is_established
        sops = []
        for i in range(N):
            ds = make_cxr_dataset(seed=900 + i, size=48)
            assert assoc.send_c_store(ds).Status == 0
            sops.append(str(ds.SOPInstanceUID))
        assoc.release()

        store = Store(pg_server_url)

        def b_is_busy() -> bool:
            from sqlalchemy import func, select

            from bonescreen.service.store import Job

            with store.session() as s:
                held = s.scalar(select(func.count()).select_from(Job).where(
                    Job.status == "processing", Job.worker.like("node-b:%")))
            done = store.job_workers()
            return bool(held) and done.get("node-b", 0) >= 2 and done.get("node-a", 0) >= 1

        _wait(b_is_busy, "both workers screening, node-b holding a lease", 120, procs, logs)
        os.kill(b.pid, signal.SIGKILL)
        b.wait(10)
        done_at_kill = len(store.all_result_sops())
        assert done_at_kill < N, "the kill came too late to test anything"

        _wait(lambda: store.pending_count() == 0 and len(store.all_result_sops()) == N, "every image screened",
              120, [a], logs[:1])
        assert Counter(store.all_result_sops()) == Counter(sops)  # one result each, none lost, none twice
        assert store.counts()["jobs"] == {"done": N}
        by = store.job_workers()
        assert by.get("node-a", 0) > 0 and by.get("node-b", 0) > 0 and sum(by.values()) == N
        inst = {i["name"]: i for i in _get(http_port, "/api/v1/instances")["instances"]}
        assert inst["node-b"]["heartbeat_age_s"] > inst["node-a"]["heartbeat_age_s"]
        # node-b's name is free again at once: same host, its process is gone
        store.register_instance("node-b", inst["node-b"]["host"], os.getpid(), "worker", run_id="restart",
                                stale_after=3600)
        results = _get(http_port, "/api/v1/results?limit=1000")["results"]
        assert len(results) == N and all(r["eligible"] for r in results)
        print(f"two workers: screened by {by}; {N - done_at_kill} finished after node-b was killed")
        store.dispose()
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) in (0, -signal.SIGTERM)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
