"""The claim's cost and plan: the same at any backlog, with any table history and statistics, and for
a worker whose types sit behind another type's backlog (sql/migrations/*_fair_claim.sql)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from worker import db
from worker.queue import CLAIM_JOBS, FINISH_JOBS, NEXT_DUE, JobQueue

Sql = psycopg.Connection[dict[str, Any]]

CLAIM_FUNCTION = "public.claim_jobs(text[], integer, text[], integer, double precision, text, double precision)"


def claim_params(types: list[str], limit: int = 1, *, affine: list[str] | None = None, window: int | None = None,
                 aging_seconds: float = 300) -> dict[str, Any]:
    return {"job_types": types, "limit": limit, "affine_types": affine or [], "window": window or limit,
            "aging_seconds": aging_seconds, "worker_id": "explain", "lease_seconds": 30}


def explain_claim(sql: Sql, params: dict[str, Any], *, analyze: bool = True) -> str:
    """The plan of the statement public.claim_jobs runs for these parameters (its first without
    affinity and caps, else its second), prepared under the function's own settings. With analyze
    the claim runs, in a transaction that is rolled back."""
    row = sql.execute("select prosrc, proconfig, proargnames, array(select format_type(t, null)"
                      " from unnest(proargtypes) as t) as types from pg_proc where oid = %s::regprocedure",
                      (CLAIM_FUNCTION,)).fetchone()
    assert row is not None
    statements = re.findall(r"return query\s+(.*?);", row["prosrc"], re.S | re.I)
    assert len(statements) == 2, "claim_jobs: a statement without affinity and caps, and one with"
    capped = sql.execute("select exists (select 1 from public.job_quotas where max_running_jobs is not null)"
                         " as yes").fetchone()
    assert capped is not None
    statement = statements[1] if params["affine_types"] or capped["yes"] else statements[0]
    names: list[str] = row["proargnames"][:len(row["types"])]
    body = re.sub(r"claim_jobs\.(\w+)", lambda m: f"${names.index(m.group(1)) + 1}", statement)
    values = [params["job_types"], params["limit"], params["affine_types"], params["window"],
              params["aging_seconds"], params["worker_id"], params["lease_seconds"]]
    name = f"claim_probe_{uuid.uuid4().hex[:8]}"
    options = "analyze, buffers, timing off, costs off" if analyze else "costs off"
    # Client-side binding (the simple query protocol): through a bind, the server would take the
    # body's $n for that bind's own parameters.
    cur = psycopg.ClientCursor(sql)
    try:
        with sql.transaction(force_rollback=True):
            for setting in row["proconfig"]:
                key, value = setting.split("=", 1)
                cur.execute("select set_config(%s, %s, true)", (key, value))
            cur.execute(f"prepare {name} ({', '.join(row['types'])}) as {body}")
            plan = cur.execute(f"explain ({options}) execute {name} ({', '.join(['%s'] * len(values))})",
                               values).fetchall()
    finally:
        cur.execute(f"deallocate {name}")
    return "\n".join(r["QUERY PLAN"] for r in plan)


def claim_buffers(sql: Sql, params: dict[str, Any]) -> int:
    """Shared buffers one claim touches (hit + read), the function and everything it runs, once the
    session has planned it (the first call also reads the catalogs)."""
    touched = []
    for _ in range(2):
        with sql.transaction(force_rollback=True):
            plan = sql.execute("explain (analyze, buffers, format json) " + CLAIM_JOBS, params).fetchone()
        assert plan is not None
        top = plan["QUERY PLAN"][0]["Plan"]
        touched.append(int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"]))
    return touched[-1]


def add_types(sql: Sql, *names: str) -> None:
    for name in names:
        sql.execute("insert into public.job_types (name, queue, handler) values (%s, 'bench', 'noop')"
                    " on conflict (name) do nothing", (name,))


def bulk_queued(sql: Sql, job_type: str, n: int) -> None:
    """n due jobs of one service user, as the insert trigger would have turned them, in one statement
    with the triggers off: the backlog a test needs without its seconds of row triggers."""
    sql.execute("set session_replication_role = replica")
    try:
        start = sql.execute("select coalesce(max(turn) + 1, 0) as t from public.jobs where status = 'queued'"
                            " and user_id is null and priority = 0").fetchone()
        assert start is not None
        sql.execute("insert into public.jobs (job_type, queue, max_attempts, payload, turn, run_at)"
                    " select %s, 'bench', 3, '{}', %s + g, now() - interval '1 hour' + g * interval '1 microsecond'"
                    " from generate_series(0, %s - 1) as g", (job_type, start["t"], n))
    finally:
        sql.execute("set session_replication_role = origin")


def bulk_history(sql: Sql, job_type: str, n: int) -> None:
    sql.execute("set session_replication_role = replica")
    try:
        sql.execute("insert into public.jobs (job_type, queue, max_attempts, payload, status, result, attempts,"
                    " worker_id, created_at, run_at, started_at, finished_at)"
                    " select %s, 'bench', 3, '{}', 'completed', '{}', 1, 'old', now() - interval '2 days',"
                    " now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'"
                    " from generate_series(1, %s)", (job_type, n))
    finally:
        sql.execute("set session_replication_role = origin")


@pytest.fixture
def sql(database_url: str) -> Any:
    with db.connect(database_url) as conn:
        # no autoanalyze behind the test's back: the statistics stay as each test leaves them
        conn.execute("alter table public.jobs set (autovacuum_enabled = false)")
        add_types(conn, "type_a", "type_b")
        yield conn


def assert_index_plan(plan: str) -> None:
    assert re.search(r"Index (Only )?Scan using jobs_claim_idx on jobs", plan), plan
    assert "Index Cond: ((job_type = t.job_type) AND (run_at <= now()))" in plan, plan
    assert "Seq Scan on jobs" not in plan and "Bitmap" not in plan, plan


def head_rows(plan: str) -> int:
    """Rows the head's index scan returned, summed over the served types."""
    found = re.search(r"Index (?:Only )?Scan using jobs_claim_idx on jobs \w+ \(actual rows=(\d+) loops=(\d+)\)", plan)
    assert found, plan
    return int(found.group(1)) * int(found.group(2))


def test_stale_statistics_keep_the_plan(sql: Sql) -> None:
    """The usual state of a long-lived table: analyzed when it held only finished jobs, then a burst."""
    bulk_history(sql, "type_a", 20_000)
    sql.execute("analyze public.jobs")
    bulk_queued(sql, "type_a", 20_000)
    plan = explain_claim(sql, claim_params(["type_a"], 4))
    assert_index_plan(plan)
    assert head_rows(plan) == 4 + 4  # the claim's jobs and its slack: none of the other 19,992
    assert "rows=4 loops=1" in plan.splitlines()[0], plan  # the update took four


def test_mixed_backlog_reads_only_the_served_type(sql: Sql) -> None:
    bulk_queued(sql, "type_a", 20_000)  # nobody here serves type_a
    bulk_queued(sql, "type_b", 5)
    for analyzed in (False, True):
        if analyzed:
            sql.execute("analyze public.jobs")
        plan = explain_claim(sql, claim_params(["type_b"], 1))
        assert_index_plan(plan)
        assert head_rows(plan) <= 1 + 1, plan
    sql.execute("update public.job_quotas set max_running_jobs = 3 where job_type is null")  # the second statement
    plan = explain_claim(sql, claim_params(["type_b"], 1))
    assert_index_plan(plan)
    assert "jobs_user_running_idx" in plan and head_rows(plan) <= 1 + 1, plan


def test_fresh_table_never_analyzed(sql: Sql) -> None:
    bulk_queued(sql, "type_a", 10_000)
    plan = explain_claim(sql, claim_params(["type_a", "type_b"], 2, affine=["type_b"], window=16))
    assert_index_plan(plan)
    assert head_rows(plan) <= 2 * (8 + 2), plan


def test_claim_cost_does_not_grow_with_the_backlog(sql: Sql) -> None:
    """Buffers one claim touches, through the function as the worker calls it: a small backlog, then
    one 20 times larger of the same type and a history of finished jobs behind it."""
    bulk_queued(sql, "type_b", 500)
    small = claim_buffers(sql, claim_params(["type_b"], 4))
    bulk_queued(sql, "type_b", 10_000)
    bulk_queued(sql, "type_a", 10_000)
    bulk_history(sql, "type_b", 10_000)
    large = claim_buffers(sql, claim_params(["type_b"], 4))
    sql.execute("analyze public.jobs")
    analyzed = claim_buffers(sql, claim_params(["type_b"], 4))
    assert small < 150, small
    # a level more in the indexes it descends, nothing per queued or finished row
    assert large <= small + 12 and analyzed <= small + 12, (small, large, analyzed)


def test_next_due_probes_one_index_entry_per_type(sql: Sql) -> None:
    bulk_queued(sql, "type_a", 20_000)  # due: not what next_due looks for
    sql.execute("insert into public.jobs (job_type, payload, run_at)"
                " values ('type_a', '{}', now() + interval '1 hour')")
    sql.execute("analyze public.jobs")
    plan = "\n".join(r["QUERY PLAN"] for r in sql.execute(
        "explain (analyze, timing off, costs off) " + NEXT_DUE,
        {"job_types": ["type_a", "type_b"], "since_seconds": 1.0}).fetchall())
    assert "Index Only Scan using jobs_due_idx" in plan or "Index Scan using jobs_due_idx" in plan, plan
    assert "Seq Scan" not in plan and "rows=20000" not in plan, plan


def test_next_due_is_the_earliest_scheduled_job(sql: Sql, queue: JobQueue) -> None:
    assert queue.next_due(["type_a"]) is None
    queue.enqueue("type_a", {}, run_at=datetime.now(UTC) - timedelta(minutes=1))  # due: claimable, no timer
    later = sql.execute("insert into public.jobs (job_type, payload, run_at) values"
                        " ('type_a', '{}', now() + interval '1 hour'), ('type_b', '{}', now() + interval '2 hours')"
                        " returning run_at").fetchall()
    assert queue.next_due(["type_a"]) == later[0]["run_at"]
    assert queue.next_due(["type_a", "type_b"]) == later[0]["run_at"]
    assert queue.next_due(["type_b"]) == later[1]["run_at"]
    # since a claim that took every slot a minute ago: the job that came due meanwhile counts
    assert queue.next_due(["type_a"], since_seconds=120) < datetime.now(UTC)


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed-before-burst"])
def test_finish_does_not_scan_the_table(sql: Sql, analyzed: bool) -> None:
    bulk_history(sql, "type_a", 20_000)
    if analyzed:
        sql.execute("analyze public.jobs")
    bulk_queued(sql, "type_a", 2_000)
    pool = db.make_pool(sql.info.dsn, 1)
    try:
        worker = JobQueue(pool, "finisher")
        [job] = worker.claim(["type_a"], 1)
    finally:
        pool.close()
    outcomes = Jsonb([{"id": str(job.id), "status": "completed", "result": {}, "error": None, "retry_delay": 0,
                       "refund": False}])
    with sql.transaction(force_rollback=True):
        plan = "\n".join(r["QUERY PLAN"] for r in sql.execute(
            "explain (analyze, timing off, costs off) " + FINISH_JOBS,
            {"worker_id": "finisher", "outcomes": outcomes}).fetchall())
    assert "Seq Scan on jobs" not in plan, plan
    assert "rows=1 loops=1" in plan.splitlines()[0], plan


def test_claim_returns_jobs_in_claim_order(sql: Sql, queue: JobQueue) -> None:
    low = queue.enqueue("type_a", {}, priority=-5)
    first, second = queue.enqueue("type_a", {}), queue.enqueue("type_b", {})
    high = queue.enqueue("type_b", {}, priority=5)
    claimer = JobQueue(queue.pool, "ordered")
    assert [j.id for j in claimer.claim(["type_a", "type_b"], 4)] == [high, first, second, low]


def test_concurrent_claims_pass_over_each_others_rows(sql: Sql, database_url: str, queue: JobQueue) -> None:
    """Worker A's claim holds its rows until it commits; B, claiming at that moment from the same
    head, takes the next ones instead of coming back empty or waiting."""
    ids = [queue.enqueue("type_a", {"n": i}) for i in range(6)]
    with db.connect(database_url) as a, db.connect(database_url) as b, a.transaction():
        got_a = [r["id"] for r in a.execute(CLAIM_JOBS, {**claim_params(["type_a"], 1), "window": 8,
                                                         "worker_id": "a"}).fetchall()]
        got_b = [r["id"] for r in b.execute(CLAIM_JOBS, {**claim_params(["type_a"], 1), "window": 8,
                                                         "worker_id": "b"}).fetchall()]
    assert got_a == [ids[0]] and got_b == [ids[1]]


def test_a_claim_does_not_wait_for_the_last_jobs_outcome_to_commit(queue: JobQueue, start_worker: Any,
                                                                    sql: Sql) -> None:
    """One slot: job A's outcome takes a second to commit (a trigger sleeps in it, as a slow disk would
    in its WAL flush); job B is claimed and run meanwhile, not after."""
    from tests.conftest import wait_status
    from tests.support import ProbeHandler

    sql.execute("create table finish_log (at timestamptz)")
    sql.execute("""
        create function slow_finish() returns trigger language plpgsql as $$
        begin perform pg_sleep(1); insert into finish_log values (clock_timestamp()); return new; end $$""")
    sql.execute("create trigger slow_finish after update of status on public.jobs for each row"
                " when (new.status = 'completed' and new.payload ? 'slow') execute function slow_finish()")
    a = queue.enqueue("type_a", {"slow": True})
    b = queue.enqueue("type_a", {})
    start_worker({"noop": ProbeHandler()}, queues=["bench"], concurrency=1)
    wait_status(queue, a, "completed")
    committed = sql.execute("select at from finish_log").fetchone()
    started = wait_status(queue, b, "processing", "completed")["started_at"]
    assert committed is not None and started < committed["at"], (started, committed)


def test_a_claim_says_whether_due_jobs_were_left(sql: Sql, queue: JobQueue) -> None:
    for _ in range(3):
        queue.enqueue("type_a", {})
    queue.enqueue("type_b", {}, run_at=datetime.now(UTC) + timedelta(hours=1))  # not due: not counted
    claimer = JobQueue(queue.pool, "counting")
    first = claimer.claim(["type_a", "type_b"], 1)
    assert len(first) == 1 and first.more_queued
    rest = claimer.claim(["type_a", "type_b"], 2)
    assert len(rest) == 2 and not rest.more_queued  # the worker waits for a notify, not for a free slot
    none = claimer.claim(["type_a", "type_b"], 2)
    assert none == [] and not none.more_queued
