"""Loop semantics against a real Postgres, with the worker running in a thread of the test."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.conftest import wait_for, wait_status
from tests.support import NoopHandler, ProbeHandler
from worker.handlers.base import builtin_handlers
from worker.queue import JobQueue, LeaseLost


@pytest.fixture
def probe_type(queue: JobQueue) -> str:
    queue.upsert_job_type("probe", "test", "probe", max_attempts=3)
    return "probe"


def probe_handlers() -> dict[str, Any]:
    return {**builtin_handlers(), "probe": ProbeHandler(), "noop": NoopHandler()}


def test_job_moves_queued_processing_completed_with_progress(queue, start_worker, sql):
    job_id = queue.enqueue("simulate", {"prompt": "hi", "config": {"steps": 5, "step_seconds": 0.1}})
    assert queue.get_job(job_id)["status"] == "queued"
    start_worker()
    running = wait_status(queue, job_id, "processing")
    assert running["worker_id"] and running["lease_expires_at"] and running["attempts"] == 1
    seen = wait_for(lambda: (r := queue.get_job(job_id)) and 0 < r["progress"] < 100 and r)
    assert seen["stage"].startswith("step")
    done = wait_status(queue, job_id, "completed")
    assert done["progress"] == 100 and done["finished_at"] and done["error"] is None
    asset = done["result"]["assets"][0]
    assert asset["path"] == f"service/{job_id}/0.json" and asset["bucket"] == "simulate"
    assert asset["size"] > 0 and asset["url"].startswith("file://")


def test_invalid_payload_fails_that_job_and_worker_continues(queue, start_worker):
    bad = queue.enqueue("simulate", {"config": {"steps": 0}})
    huge = queue.enqueue("simulate", {"prompt": "x" * 5000})
    good = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})
    start_worker()
    for job_id in (bad, huge):
        row = wait_status(queue, job_id, "failed")
        assert row["error"]["code"] == "INVALID_INPUT" and row["error"]["retryable"] is False
        assert row["attempts"] == 1 and len(row["errors"]) == 1
    assert "config.steps" in queue.get_job(bad)["error"]["message"]
    assert "prompt" in queue.get_job(huge)["error"]["message"]
    assert wait_status(queue, good, "completed")["result"]["steps"] == 1


def test_unknown_job_type_fails_at_insert(queue):
    job_id = queue.enqueue("no_such_type", {"prompt": "x"})
    row = queue.get_job(job_id)
    assert row["status"] == "failed" and row["error"]["code"] == "UNKNOWN_JOB_TYPE"
    assert row["finished_at"] is not None


def test_handler_exception_and_bad_result_fail_with_codes(queue, start_worker, probe_type):
    boom = queue.enqueue(probe_type, {"raise": "exception"})
    text = queue.enqueue(probe_type, {"return": "not-a-dict"})
    start_worker(probe_handlers())
    row = wait_status(queue, boom, "failed")
    assert row["error"] == {"code": "GENERATION_FAILED", "message": "RuntimeError: boom", "retryable": False}
    assert wait_status(queue, text, "failed")["error"]["code"] == "GENERATION_FAILED"


def test_retry_with_backoff_then_success(queue, start_worker, probe_type):
    job_id = queue.enqueue(probe_type, {"raise": "retryable", "fail_attempts": 2})
    start_worker(probe_handlers())
    row = wait_status(queue, job_id, "completed", timeout=20)
    assert row["attempts"] == 3 and row["result"]["attempt"] == 3
    assert [e["code"] for e in row["errors"]] == ["NETWORK_ERROR", "NETWORK_ERROR"]
    assert [e["attempt"] for e in row["errors"]] == [1, 2]
    assert row["error"] is None


def test_backoff_delays_the_retry(queue, probe_type, settings, start_worker):
    job_id = queue.enqueue(probe_type, {"raise": "retryable", "fail_attempts": 1})
    start_worker(probe_handlers(), retry_base_seconds=2.0, retry_max_seconds=2.0)
    row = wait_for(lambda: (r := queue.get_job(job_id)) and r["errors"] and r["status"] == "queued" and r)
    delay = (row["run_at"] - row["updated_at"]).total_seconds()
    assert 0.9 <= delay <= 2.1  # half fixed, half jitter of a 2 s ceiling
    assert wait_status(queue, job_id, "completed", timeout=10)["attempts"] == 2


def test_max_attempts_then_failed_with_history(queue, start_worker, probe_type):
    job_id = queue.enqueue(probe_type, {"raise": "retryable"}, max_attempts=2)
    start_worker(probe_handlers())
    row = wait_status(queue, job_id, "failed", timeout=20)
    assert row["attempts"] == 2 and len(row["errors"]) == 2
    assert row["error"]["code"] == "NETWORK_ERROR" and row["error"]["retryable"] is False
    assert "gave up after 2 attempts" in row["error"]["message"]


def test_cancel_queued_job_never_runs(queue, start_worker, probe_type, tmp_path, monkeypatch):
    monkeypatch.setenv("OURVIDZ_TEST_RECORD", str(tmp_path / "runs"))
    job_id = queue.enqueue(probe_type, {})
    assert queue.request_cancel(job_id) == "canceled"
    row = queue.get_job(job_id)
    assert row["status"] == "canceled" and row["finished_at"] is not None
    worker = start_worker(probe_handlers(), max_jobs=1)
    other = queue.enqueue(probe_type, {})
    wait_status(queue, other, "completed")
    worker.thread.join(10)
    assert str(job_id) not in (tmp_path / "runs").read_text()


def test_cancel_running_job_stops_it_without_result(queue, start_worker, probe_type):
    job_id = queue.enqueue(probe_type, {"steps": 400, "step_seconds": 0.02})
    start_worker(probe_handlers())
    wait_for(lambda: queue.get_job(job_id)["progress"] > 0)
    requested = time.monotonic()
    assert queue.request_cancel(job_id) == "processing"
    row = wait_status(queue, job_id, "canceled")
    assert time.monotonic() - requested < 2.0
    assert row["result"] is None and row["finished_at"] is not None and row["progress"] < 100


def test_cancellation_cannot_be_swallowed_by_handler(queue, start_worker, probe_type):
    job_id = queue.enqueue(probe_type, {"raise": "swallow", "sleep": 2})
    start_worker(probe_handlers())
    wait_for(lambda: queue.get_job(job_id)["stage"] == "trying to swallow")
    queue.request_cancel(job_id)
    row = wait_status(queue, job_id, "canceled", timeout=10)
    assert row["stage"] == "canceled" and row["result"] is None


def test_terminal_rows_never_change(queue, sql):
    job_id = queue.enqueue("no_such_type", {})
    with pytest.raises(psycopg.errors.CheckViolation, match="already failed"):
        sql.execute("update jobs set status = 'queued' where id = %s", (job_id,))
    assert queue.request_cancel(job_id) is None


def test_fence_rejects_a_stale_worker(queue, database_url, probe_type):
    from worker import db

    pool = db.make_pool(database_url, 2)
    stale = JobQueue(pool, "worker-a", lease_seconds=0.2)
    fresh = JobQueue(pool, "worker-b", lease_seconds=30)
    from worker.queue import Outcome

    job_id = queue.enqueue(probe_type, {})
    stale.claim([probe_type], 1)
    time.sleep(0.3)
    assert fresh.rescue_expired() == {job_id: "queued"}
    [again] = fresh.claim([probe_type], 1)
    assert again.id == job_id and again.attempts == 2
    with pytest.raises(LeaseLost):
        stale.report_progress(job_id, 50, "stale")
    assert stale.finish([Outcome(job_id, "completed", result={"forged": True})]) == {}
    assert stale.heartbeat([job_id], "busy").held == set()
    assert stale.release([job_id]) == set()
    assert fresh.finish([Outcome(job_id, "completed", result={"ok": 1})]) == {job_id: "completed"}
    row = queue.get_job(job_id)
    assert row["result"] == {"ok": 1} and row["worker_id"] == "worker-b"
    assert [e["code"] for e in row["errors"]] == ["WORKER_LOST"]
    pool.close()


def test_rescue_fails_job_at_max_attempts_with_worker_lost(queue, database_url, probe_type):
    from worker import db

    pool = db.make_pool(database_url, 2)
    dying = JobQueue(pool, "dying", lease_seconds=0.1)
    job_id = queue.enqueue(probe_type, {}, max_attempts=1)
    dying.claim([probe_type], 1)
    time.sleep(0.2)
    assert dying.rescue_expired() == {job_id: "failed"}
    row = queue.get_job(job_id)
    assert row["error"]["code"] == "WORKER_LOST" and row["error"]["retryable"] is False
    assert row["errors"][0]["worker_id"] == "dying"
    pool.close()


def test_progress_writes_are_throttled(queue, start_worker, probe_type, sql):
    sql.execute("create table progress_log (at timestamptz default clock_timestamp(), progress int, stage text)")
    sql.execute("""
        create function log_progress() returns trigger language plpgsql as $$
        begin insert into progress_log (progress, stage) values (new.progress, new.stage); return new; end $$""")
    sql.execute("create trigger t after update of progress on jobs for each row execute function log_progress()")
    job_id = queue.enqueue(probe_type, {"steps": 150, "step_seconds": 0.01})
    start_worker(probe_handlers(), progress_interval=0.5)
    wait_status(queue, job_id, "completed")
    rows = sql.execute("select progress, stage, at from progress_log order by at").fetchall()
    assert rows[0]["stage"] == "running" and rows[-1]["stage"] == "completed"  # the claim and the finish
    writes = rows[1:-1]
    assert writes[0]["progress"] == 0  # the first report always goes out
    elapsed = (writes[-1]["at"] - writes[0]["at"]).total_seconds()
    assert 3 <= len(writes) <= elapsed / 0.5 + 1, writes
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in itertools.pairwise(writes)]
    assert all(gap >= 0.45 for gap in gaps), gaps
    assert rows[-1]["progress"] == 100


def test_listen_wakes_idle_worker_quickly(queue, start_worker, probe_type, sql):
    worker = start_worker(probe_handlers(), poll_interval=60)
    wait_for(lambda: worker.worker._listening.is_set())
    time.sleep(0.3)  # idle: the start-up claim found nothing
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        job_id = queue.enqueue(probe_type, {})
        wait_status(queue, job_id, "completed", timeout=5)
        latencies.append(time.monotonic() - t0)
    assert max(latencies) < 1.0, latencies  # far below the 60 s poll


def test_polling_fallback_without_listen(queue, start_worker, probe_type):
    worker = start_worker(probe_handlers(), listen=False, fallback_poll_interval=0.2)
    time.sleep(0.3)
    assert not worker.worker._listening.is_set()
    job_id = queue.enqueue(probe_type, {})
    wait_status(queue, job_id, "completed", timeout=3)


def test_listen_connection_drop_falls_back_then_recovers(queue, start_worker, probe_type, sql):
    worker = start_worker(probe_handlers(), poll_interval=60, fallback_poll_interval=0.2)
    wait_for(lambda: worker.worker._listening.is_set())
    killed = sql.execute("""
        select pg_terminate_backend(pid) as ok from pg_stat_activity
        where datname = current_database() and query ilike 'LISTEN%%'""").fetchall()
    assert killed and all(r["ok"] for r in killed)
    job_id = queue.enqueue(probe_type, {})
    wait_status(queue, job_id, "completed", timeout=5)
    wait_for(lambda: worker.worker._listening.is_set(), timeout=10)


def test_claim_uses_partial_index(queue, sql, probe_type):
    queue.enqueue_many(probe_type, [{"n": i} for i in range(2000)])
    sql.execute("analyze jobs")
    from tests.test_claim import explain_claim

    params = {"job_types": ["probe"], "limit": 1, "affine_types": ["probe"], "window": 256,
              "aging_seconds": 300, "worker_id": "w", "lease_seconds": 30}
    text = explain_claim(sql, params, analyze=False)  # the plan of the claim's statement, as claim_jobs runs it
    assert "Index Scan using jobs_claim_idx" in text, text


def test_claim_prefers_types_whose_model_is_loaded_but_not_past_the_aging_bound(queue, database_url, sql):
    from worker import db

    for name in ("type_a", "type_b"):
        queue.upsert_job_type(name, "test", "probe")
    old_a = queue.enqueue("type_a", {})
    b_ids = [queue.enqueue("type_b", {}) for _ in range(3)]
    newer_a = queue.enqueue("type_a", {})
    pool = db.make_pool(database_url, 1)
    claimer = JobQueue(pool, "affine-worker")
    # nothing loaded: oldest first
    assert [j.id for j in claimer.claim(["type_a", "type_b"], 1)] == [old_a]
    # type_b loaded here: the b jobs jump the newer a job
    assert [j.id for j in claimer.claim(["type_a", "type_b"], 2, affine_types=["type_b"])] == b_ids[:2]
    # an a job that waited past the aging bound is taken before an affine b job
    sql.execute("update jobs set run_at = now() - interval '10 minutes' where id = %s", (newer_a,))
    got = claimer.claim(["type_a", "type_b"], 1, affine_types=["type_b"], aging_seconds=60)
    assert [j.id for j in got] == [newer_a]
    pool.close()


def test_migrations_apply_twice_and_are_recorded(database_url):
    from worker import db

    assert db.migrate(database_url) == []  # already applied by the template
    with db.connect(database_url) as conn:
        rows = conn.execute("select version, name, statements from supabase_migrations.schema_migrations").fetchall()
    assert rows and all(r["statements"] for r in rows)
    assert any("create table public.jobs" in s for r in rows for s in r["statements"])


def test_concurrency_runs_jobs_in_parallel(queue, start_worker, probe_type):
    ids = [queue.enqueue(probe_type, {"sleep": 1.0}) for _ in range(4)]
    t0 = time.monotonic()
    start_worker(probe_handlers(), concurrency=4)
    for job_id in ids:
        wait_status(queue, job_id, "completed")
    assert time.monotonic() - t0 < 3.0


def test_max_jobs_exits(queue, start_worker, probe_type):
    ids = [queue.enqueue(probe_type, {}) for _ in range(3)]
    worker = start_worker(probe_handlers(), max_jobs=2)
    worker.thread.join(15)
    assert not worker.thread.is_alive() and worker.stats.completed == 2
    assert sorted(queue.get_job(i)["status"] for i in ids) == ["completed", "completed", "queued"]


def test_graceful_shutdown_waits_for_running_job(queue, start_worker, probe_type, sql):
    job_id = queue.enqueue(probe_type, {"sleep": 1.0})
    worker = start_worker(probe_handlers(), shutdown_grace=10)
    wait_status(queue, job_id, "processing")
    worker.stop()
    assert queue.get_job(job_id)["status"] == "completed"
    state = sql.execute("select state from workers where id = %s", (worker.worker.id,)).fetchone()
    assert state["state"] == "stopped"


def test_shutdown_past_grace_releases_job(queue, start_worker, probe_type, sql):
    job_id = queue.enqueue(probe_type, {"sleep": 30})
    worker = start_worker(probe_handlers(), shutdown_grace=0.5)
    wait_status(queue, job_id, "processing")
    worker.stop()
    row = queue.get_job(job_id)
    assert row["status"] == "queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert worker.stats.released == 1
    again = start_worker(probe_handlers())
    assert again
    # the released job is picked up again; a short sleep payload would finish, this one we cancel
    wait_status(queue, job_id, "processing")
    queue.request_cancel(job_id)
    wait_status(queue, job_id, "canceled")


def test_worker_row_registered(start_worker, sql):
    worker = start_worker(queues=["demo"])
    row = wait_for(lambda: sql.execute("select * from workers where id = %s", (worker.worker.id,)).fetchone())
    assert row["queues"] == ["demo"] and "simulate" in row["job_types"] and row["state"] in ("idle", "busy")


def test_new_job_type_is_served_without_restart(queue, start_worker):
    worker = start_worker({**builtin_handlers(), "noop": NoopHandler()})
    wait_for(lambda: worker.worker._listening.is_set())
    name = f"custom_{uuid.uuid4().hex[:6]}"
    queue.upsert_job_type(name, "custom", "noop")
    job_id = queue.enqueue(name, {})
    assert wait_status(queue, job_id, "completed")["result"] == {"ok": True}


def test_batching_handler_gets_claimed_jobs_as_one_batch(queue, start_worker):
    from tests.support import BatchProbeHandler

    handler = BatchProbeHandler()
    queue.upsert_job_type("batchy", "test", "batchy")
    ids = [queue.enqueue("batchy", {"n": i, "fail": i == 2}) for i in range(6)]
    start_worker({"batchy": handler}, concurrency=8)
    rows = [wait_status(queue, job_id, "completed", "failed") for job_id in ids]
    assert sorted(handler.batches) == [2, 4]
    assert [r["status"] for r in rows] == ["completed"] * 2 + ["failed"] + ["completed"] * 3
    assert rows[2]["error"]["code"] == "INVALID_INPUT"
    assert {r["result"]["n"] for r in rows if r["result"]} == {0, 1, 3, 4, 5}


def test_result_the_database_cannot_store_fails_only_that_job(queue, start_worker):
    from tests.support import NulResultHandler

    queue.upsert_job_type("nul", "test", "nul")
    bad = queue.enqueue("nul", {"nul": True})
    nan = queue.enqueue("nul", {"nan": True})
    good = queue.enqueue("nul", {})
    start_worker({"nul": NulResultHandler()}, concurrency=3)
    row = wait_status(queue, bad, "failed")
    assert row["error"]["code"] == "GENERATION_FAILED" and "NUL" in row["error"]["message"]
    row = wait_status(queue, nan, "failed")
    assert row["error"]["code"] == "GENERATION_FAILED" and "could not be stored" in row["error"]["message"]
    assert wait_status(queue, good, "completed")["result"] == {"text": "fine"}


def test_concurrent_claims_each_get_jobs(queue, database_url, probe_type):
    from worker import db
    from worker.queue import CLAIM_JOBS

    ids = [queue.enqueue(probe_type, {"n": i}) for i in range(10)]
    params = {"job_types": [probe_type], "limit": 4, "affine_types": [], "window": 4, "aging_seconds": 300,
              "lease_seconds": 30}
    with db.connect(database_url) as a, db.connect(database_url) as b:
        with a.transaction():  # worker A's claim, not yet committed, holds its rows
            got_a = {r["id"] for r in a.execute(CLAIM_JOBS, {**params, "worker_id": "a"}).fetchall()}
            got_b = {r["id"] for r in b.execute(CLAIM_JOBS, {**params, "worker_id": "b"}).fetchall()}
        assert len(got_a) == 4 and len(got_b) == 4 and not got_a & got_b
        assert got_a | got_b == set(ids[:8])
