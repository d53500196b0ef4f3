"""A fleet with one misconfigured worker fails no job (issue 10, item 2), as real processes.

Two `ourvidz-worker run` processes drain one queue through the real supabase-py client against the
stand-in of tests/storage_standin.py, which fakes the network edge of Supabase Storage. Both keys are
accepted at start (so both pass the preflight and register); then one key is revoked, as a rotated
or expired service key is: that worker's uploads are refused. Its jobs must go back to the queue
without spending an attempt, the healthy worker must complete every job, and the misconfigured
worker's `workers` row must say why it takes no more work. A real Postgres (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.storage_standin import FakeStorageAPI, fake_api_fixture  # noqa: F401 - the fake_api fixture
from worker import db
from worker.queue import JobQueue

REPO_ROOT = Path(__file__).resolve().parent.parent
TYPE, QUEUE, BUCKET = "publish_fleet", "fleet", "image_fast"
GOOD, BAD = "good-service-key", "soon-revoked-service-key"
JOBS = 20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, Linux signals")


class Fleet:
    def __init__(self, database_url: str, api: FakeStorageAPI, tmp_path: Path) -> None:
        self.url, self.api, self.tmp = database_url, api, tmp_path
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, worker_id: str, key: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "SUPABASE_"))
               and k != "DATABASE_URL"}
        env.update(DATABASE_URL=self.url, OURVIDZ_HOME=str(self.tmp / worker_id), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
                   OURVIDZ_STORAGE_BACKEND="supabase", SUPABASE_URL=self.api.url, SUPABASE_SERVICE_ROLE_KEY=key,
                   OURVIDZ_STORAGE_PUBLIC_BUCKETS="", OURVIDZ_STORAGE_ATTEMPTS="1",
                   OURVIDZ_FAULT_RETRY_SECONDS="30", OURVIDZ_RETRY_BASE_SECONDS="0.2")
        log = self.tmp / f"{worker_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", "--worker-id", worker_id, "--queues", QUEUE,
                 "--concurrency", "2", "--lease-seconds", "3", "--handler",
                 "publish=tests.storage_standin:PublishingHandler"],
                env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[worker_id] = (proc, log)

    def logs(self) -> str:
        return "\n".join(f"--- {w}\n{log.read_text()[-3000:]}" for w, (_, log) in self.procs.items())

    def alive(self) -> bool:
        for worker_id, (proc, _) in self.procs.items():
            assert proc.poll() is None, f"{worker_id} exited {proc.returncode}\n{self.logs()}"
        return True

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def fleet(database_url: str, fake_api: FakeStorageAPI, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(database_url, fake_api, tmp_path)
    yield fleet
    fleet.stop()


def rows(url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def test_one_worker_with_a_refused_key_fails_no_job(fleet: Fleet, fake_api: FakeStorageAPI, queue: JobQueue,
                                                    database_url: str) -> None:
    queue.upsert_job_type(TYPE, QUEUE, "publish", bucket=BUCKET, max_attempts=3)
    fake_api.public[BUCKET] = False  # the service role sees the bucket: both keys pass the preflight
    fake_api.accepted_keys |= {GOOD, BAD}
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    good, bad = f"{prefix}-good", f"{prefix}-bad"
    fleet.start(good, GOOD)
    fleet.start(bad, BAD)
    wait_for(lambda: fleet.alive() and len(rows(database_url, "select id from workers where id like %s and "
                                                 "state = 'idle'", prefix + "%")) == 2, timeout=60, interval=0.1)
    fake_api.accepted_keys.discard(BAD)  # rotated: the bad worker's uploads are refused from now on

    ids = [queue.enqueue(TYPE, {"sleep": 0.1, "n": i}) for i in range(JOBS)]
    done = wait_for(lambda: fleet.alive() and (r := rows(database_url, "select id, status, attempts, errors, "
                    "worker_id from jobs where id = any(%s)", ids)) and all(j["status"] in ("completed", "failed")
                                                                         for j in r) and r, timeout=60, interval=0.1)
    assert [j for j in done if j["status"] != "completed"] == [], fleet.logs()
    assert {j["worker_id"] for j in done} == {good}, "the healthy worker completed them all"
    assert all(j["attempts"] == 1 for j in done), "a job the bad worker gave back spent no attempt"
    given_back = [e for j in done for e in j["errors"]]
    assert given_back, "the bad worker did claim jobs (else this test proves nothing)"
    assert all(e["code"] == "STORAGE_ERROR" and e.get("scope") == "storage" for e in given_back)
    [row] = rows(database_url, "select faults, state from workers where id = %s", bad)
    assert "refused the service key" in row["faults"].get("storage", ""), row
    assert rows(database_url, "select faults from workers where id = %s", good)[0]["faults"] == {}
    assert {name for _, name in fake_api.objects} == {f"service/{job_id}/0.png" for job_id in ids}
