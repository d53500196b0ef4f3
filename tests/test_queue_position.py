"""Where a signed-in user's queued jobs stand: public.job_queue_position(), called the way PostgREST
runs `supabase.rpc('job_queue_position')` (SET LOCAL ROLE authenticated and the JWT claims in
request.jwt.claims, one transaction per request)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from worker import db
from worker.config import REPO_ROOT
from worker.queue import JobQueue

Row = dict[str, Any]


class Rest:
    """One PostgREST-style request per call."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)

    def request(self, role: str, sub: uuid.UUID | None, query: str, params: Any = None) -> list[Row]:
        claims = {"role": role, **({"sub": str(sub)} if sub else {})}
        with self.conn.transaction():
            self.conn.execute("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                              (role, json.dumps(claims)))
            cur = self.conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def position(self, sub: uuid.UUID, job_ids: list[uuid.UUID] | None = None) -> list[Row]:
        """What `supabase.rpc('job_queue_position', {job_ids})` runs."""
        if job_ids is None:
            return self.request("authenticated", sub, "select * from public.job_queue_position()")
        return self.request("authenticated", sub, "select * from public.job_queue_position(job_ids => %s)",
                            (job_ids,))

    def submit(self, sub: uuid.UUID, job_type: str = "posed") -> uuid.UUID:
        """What `supabase.from('jobs').insert({job_type, payload}).select('id')` runs."""
        rows = self.request("authenticated", sub, "insert into public.jobs (job_type, payload) values (%s, '{}')"
                            " returning id", (job_type,))
        return rows[0]["id"]


@pytest.fixture
def rest(database_url: str) -> Iterator[Rest]:
    api = Rest(database_url)
    yield api
    api.conn.close()


@pytest.fixture
def users(sql: psycopg.Connection[Row]) -> list[uuid.UUID]:
    sql.execute("insert into public.job_types (name, queue, handler) values ('posed', 'paint', 'probe'),"
                " ('posed_b', 'paint', 'probe'), ('elsewhere', 'other', 'probe')")
    sql.execute("update public.job_quotas set max_active_jobs = null, max_jobs_per_minute = null"
                " where job_type is null")
    return [sql.execute("insert into auth.users (email) values (%s) returning id",
                        (f"pos{i}@example.com",)).fetchone()["id"] for i in range(3)]


def test_a_user_reads_the_place_of_their_own_queued_jobs(rest, users, queue):
    heavy, light, other = users
    heavy_jobs = [queue.enqueue("posed", {}, user_id=heavy) for _ in range(5)]
    queue.enqueue("elsewhere", {}, user_id=heavy)  # another queue: not ahead of anyone here
    light_job = rest.submit(light)
    light_b = rest.submit(light, "posed_b")  # same queue, another type: behind light's first job
    [mine, second] = rest.position(light)
    # round robin: after the heavy user's first job, before their other four
    assert (mine["job_id"], mine["position"], mine["position_exact"]) == (light_job, 2, True)
    assert (mine["job_type"], mine["queue"], mine["priority"]) == ("posed", "paint", 0)
    assert (second["job_id"], second["position"]) == (light_b, 4)  # heavy's 1st, light's 1st, heavy's 2nd
    assert mine["throughput_per_minute"] is None and mine["estimated_start_at"] is None  # nothing finished yet
    heavy_view = {r["job_id"]: r["position"] for r in rest.position(heavy)}
    assert heavy_view[heavy_jobs[0]] == 1 and heavy_view[heavy_jobs[4]] == 7
    assert len(heavy_view) == 6
    assert rest.position(other) == []  # nothing of anyone else's


def test_estimated_start_from_the_queues_recent_throughput(rest, users, queue, sql):
    heavy, light, _ = users
    for _ in range(3):
        queue.enqueue("posed", {}, user_id=heavy)
    light_job = rest.submit(light)
    # 20 jobs of this queue finished over the last 10 minutes: 2 per minute
    sql.execute("insert into public.jobs (job_type, payload, status, result, attempts, worker_id, started_at,"
                " finished_at) select 'posed_b', '{}', 'completed', '{}', 1, 'w', now() - g * interval '30 seconds',"
                " now() - g * interval '30 seconds' from generate_series(1, 20) as g")
    [row] = rest.position(light, [light_job])
    assert row["position"] == 2
    assert row["throughput_per_minute"] == pytest.approx(2.0, rel=0.01)
    now = sql.execute("select now() as t").fetchone()["t"]
    assert isinstance(row["estimated_start_at"], datetime)
    assert abs(row["estimated_start_at"] - (now + timedelta(seconds=30))) < timedelta(seconds=5)


def test_only_queued_jobs_and_only_the_ones_asked_for(rest, users, queue):
    _, light, _ = users
    first, second = rest.submit(light), rest.submit(light)
    JobQueue(queue.pool, "w").claim(["posed"], 1)  # first is running now
    assert [r["job_id"] for r in rest.position(light)] == [second]
    assert rest.position(light, [first]) == []
    assert [r["position"] for r in rest.position(light, [second])] == [1]


def test_position_counts_stop_at_ten_thousand(rest, users, sql):
    _, light, _ = users
    sql.execute("set session_replication_role = replica")
    sql.execute("insert into public.jobs (job_type, queue, max_attempts, payload, run_at)"
                " select 'posed', 'paint', 3, '{}', now() - interval '1 hour' from generate_series(1, 10001)")
    sql.execute("set session_replication_role = origin")
    job = rest.submit(light)
    [row] = rest.position(light, [job])
    assert (row["position"], row["position_exact"]) == (10001, False)


def test_only_signed_in_users_may_call_it(rest, users):
    for role in ("anon", "service_role"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rest.request(role, None, "select * from public.job_queue_position()")


def test_a_users_insert_joins_the_round_of_the_whole_queue(rest, users, queue, database_url):
    """The turn trigger sees every user's queued jobs, not only the rows RLS shows the inserting user."""
    heavy, light, _ = users
    for _ in range(4):
        queue.enqueue("posed", {}, user_id=heavy)
    pool = db.make_pool(database_url, 1)
    try:
        JobQueue(pool, "w").claim(["posed"], 2)  # the head of the queue is the heavy user's turn 2
    finally:
        pool.close()
    job = rest.submit(light)
    assert queue.get_job(job)["turn"] == 2
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # a user cannot choose a turn
        rest.request("authenticated", light, "insert into public.jobs (job_type, payload, turn)"
                     " values ('posed', '{}', -1)")


def test_the_typescript_helper_reads_what_the_function_returns(sql: psycopg.Connection[Row]) -> None:
    """realtime/src/queuePosition.ts: QueuePosition has the function's columns, nullable where they are."""
    source = (REPO_ROOT / "realtime" / "src" / "queuePosition.ts").read_text()
    body = re.search(r"export interface QueuePosition \{\n(.*?)\n\}", source, re.S)
    assert body, "queuePosition.ts: no interface QueuePosition"
    fields = dict(re.findall(r"^  (\w+): (.+)$", body.group(1), re.M))
    columns = sql.execute("select a.name from pg_proc as p, unnest(p.proargnames, p.proargmodes) as a(name, mode)"
                          " where p.proname = 'job_queue_position' and a.mode = 't'").fetchall()
    assert list(fields) == [c["name"] for c in columns]
    assert {name for name, ts in fields.items() if "| null" in ts} == {"throughput_per_minute", "estimated_start_at"}
