"""Dashboard views and retention, on rows written in their final state with controlled times.

Rows are inserted as the superuser (the worker's role), already terminal where the test needs
it: the BEFORE INSERT trigger only fills queue and max_attempts for a known type, and each row
satisfies the table's CHECK constraints (a finished_at iff terminal, a lease while processing,
a result when completed, an error when failed).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from worker.queue import JobQueue

Row = dict[str, Any]
Sql = psycopg.Connection[Row]

VIEWS = ["job_throughput_hourly", "job_latency_24h", "job_failure_rates_24h", "queue_depth", "workers_stale",
         "user_usage"]


@pytest.fixture
def db(sql: Sql) -> Sql:
    sql.execute("set timezone = 'UTC'")
    return sql


@pytest.fixture
def now(db: Sql) -> datetime:
    return db.execute("select now() as t").fetchone()["t"]


def add(db: Sql, job_type: str, status: str, *, created: datetime, started: datetime | None = None,
        finished: datetime | None = None, user: uuid.UUID | None = None, error_code: str | None = None,
        errors: list[str] | None = None, result: dict[str, Any] | None = None, worker: str | None = None,
        run_at: datetime | None = None) -> uuid.UUID:
    """One job row as the worker leaves it in `status`."""
    error = {"code": error_code, "message": f"{error_code} happened", "retryable": False} if error_code else None
    history = [{"code": code, "message": "attempt failed", "retryable": True} for code in (errors or [])]
    if status == "completed" and result is None:
        result = {"assets": []}
    row = db.execute(
        """
        insert into public.jobs (user_id, job_type, status, payload, created_at, run_at, started_at, finished_at,
                                 attempts, worker_id, lease_expires_at, result, error, errors, progress)
        values (%(user)s, %(job_type)s, %(status)s, '{"prompt": "p"}', %(created)s, coalesce(%(run_at)s, %(created)s),
                %(started)s, %(finished)s, %(attempts)s, %(worker)s, %(lease)s, %(result)s, %(error)s,
                %(errors)s, %(progress)s)
        returning id
        """,
        {
            "user": user, "job_type": job_type, "status": status, "created": created, "run_at": run_at,
            "started": started, "finished": finished, "attempts": 1 if started else 0,
            "worker": worker or ("w-1" if started else None),
            "lease": created + timedelta(hours=1) if status == "processing" else None,
            "result": Jsonb(result) if result is not None else None, "error": Jsonb(error) if error else None,
            "errors": Jsonb(history + ([error] if error else [])),
            "progress": 100 if status == "completed" else 0,
        },
    ).fetchone()
    return row["id"]


def done(db: Sql, job_type: str, status: str, finished: datetime, *, wait: float = 1.0, run: float = 1.0,
         **kwargs: Any) -> uuid.UUID:
    """A finished job: created, waited `wait` seconds, ran `run` seconds, finished at `finished`."""
    started = finished - timedelta(seconds=run)
    return add(db, job_type, status, created=started - timedelta(seconds=wait), started=started, finished=finished,
               **kwargs)


def view(db: Sql, name: str, where: str = "true", order: str = "1") -> list[Row]:
    return db.execute(f"select * from public.{name} where {where} order by {order}").fetchall()


def new_user(db: Sql) -> uuid.UUID:
    return db.execute("insert into auth.users (email) values (%s) returning id",
                      (f"{uuid.uuid4().hex[:8]}@example.com",)).fetchone()["id"]


# --- throughput ---------------------------------------------------------------------------------


def test_throughput_per_job_type_per_hour(db: Sql, now: datetime) -> None:
    h1 = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    h2 = h1 + timedelta(hours=1)
    for minute in (10, 20, 30):
        done(db, "simulate", "completed", h1 + timedelta(minutes=minute))
    done(db, "simulate", "failed", h1 + timedelta(minutes=59, seconds=59), error_code="INVALID_INPUT")
    add(db, "simulate", "canceled", created=h1, finished=h2 + timedelta(minutes=1))  # canceled while queued
    done(db, "sdxl_image_fast", "completed", h2 + timedelta(minutes=5))
    done(db, "sdxl_image_fast", "completed", h2 + timedelta(minutes=55))
    add(db, "simulate", "queued", created=h2)  # not finished: not counted

    rows = view(db, "job_throughput_hourly", order="hour, job_type")
    assert [(r["hour"], r["job_type"], r["finished"], r["completed"], r["failed"], r["canceled"]) for r in rows] == [
        (h1, "simulate", 4, 3, 1, 0),
        (h2, "sdxl_image_fast", 2, 2, 0, 0),
        (h2, "simulate", 1, 0, 0, 1),
    ]


# --- latency ------------------------------------------------------------------------------------


def test_wait_and_run_percentiles_per_job_type(db: Sql, now: datetime) -> None:
    for i in range(1, 6):  # waits 1..5 s, runs 10..50 s
        done(db, "simulate", "completed", now - timedelta(hours=i), wait=i, run=10 * i)
    done(db, "sdxl_image_fast", "completed", now - timedelta(minutes=30), wait=7, run=9)
    # outside the 24 h window, or not completed: left out
    done(db, "simulate", "completed", now - timedelta(hours=30), wait=1000, run=1000)
    done(db, "simulate", "failed", now - timedelta(hours=1), wait=1000, run=1000, error_code="OOM_ERROR")
    done(db, "simulate", "canceled", now - timedelta(hours=1), wait=1000, run=1000)

    rows = {r["job_type"]: r for r in view(db, "job_latency_24h")}
    assert set(rows) == {"simulate", "sdxl_image_fast"}
    sim = rows["simulate"]
    assert sim["completed"] == 5
    # percentile_cont interpolates: p95 of 1..5 sits 80 % of the way from 4 to 5
    expected = {"wait_p50_s": 3.0, "wait_p95_s": 4.8, "wait_p99_s": 4.96,
                "run_p50_s": 30.0, "run_p95_s": 48.0, "run_p99_s": 49.6}
    for column, value in expected.items():
        assert sim[column] == pytest.approx(value, abs=1e-6), column
    sdxl = rows["sdxl_image_fast"]
    assert sdxl["completed"] == 1
    assert sdxl["wait_p50_s"] == sdxl["wait_p99_s"] == pytest.approx(7.0)
    assert sdxl["run_p50_s"] == sdxl["run_p99_s"] == pytest.approx(9.0)


# --- failure rates ------------------------------------------------------------------------------


def test_failure_rate_by_error_code_over_24h(db: Sql, now: datetime, queue: JobQueue) -> None:
    recent = now - timedelta(hours=2)
    for _ in range(5):
        done(db, "simulate", "completed", recent)
    done(db, "simulate", "completed", recent, errors=["NETWORK_ERROR", "NETWORK_ERROR"])  # retried, then fine
    for _ in range(2):
        done(db, "simulate", "failed", recent, error_code="INVALID_INPUT")
    done(db, "simulate", "failed", recent, error_code="OOM_ERROR", errors=["OOM_ERROR", "OOM_ERROR"])
    done(db, "simulate", "canceled", recent, errors=["NETWORK_ERROR"])  # neither success nor failure
    done(db, "simulate", "failed", now - timedelta(hours=25), error_code="INVALID_INPUT")  # too old
    done(db, "chat_conversation", "completed", recent)
    queue.enqueue("video_ultra", {"prompt": "no such type"})  # failed at insert: UNKNOWN_JOB_TYPE

    rows = view(db, "job_failure_rates_24h", order="job_type, error_code")
    got = [(r["job_type"], r["error_code"], r["failed_jobs"], r["attempt_errors"], r["finished_jobs"])
           for r in rows]
    assert got == [
        ("simulate", "INVALID_INPUT", 2, 2, 9),
        ("simulate", "NETWORK_ERROR", 0, 2, 9),
        ("simulate", "OOM_ERROR", 1, 3, 9),
        ("video_ultra", "UNKNOWN_JOB_TYPE", 1, 1, 1),
    ]
    assert [r["failure_rate"] for r in rows] == pytest.approx([2 / 9, 0.0, 1 / 9, 1.0])


# --- queue depth --------------------------------------------------------------------------------


def test_queue_depth_and_oldest_queued_age(db: Sql, now: datetime, queue: JobQueue) -> None:
    for minutes in (10, 5, 1):
        add(db, "simulate", "queued", created=now - timedelta(minutes=minutes))
    add(db, "simulate", "queued", created=now - timedelta(hours=2), run_at=now + timedelta(hours=1))  # a retry later
    for _ in range(2):
        add(db, "simulate", "processing", created=now - timedelta(minutes=30), started=now - timedelta(minutes=1))
    done(db, "simulate", "completed", now - timedelta(minutes=1))
    add(db, "sdxl_image_fast", "processing", created=now - timedelta(minutes=2), started=now - timedelta(minutes=1))
    # a queue whose job type was removed while work was still waiting
    queue.upsert_job_type("retired_type", "gpu2", "noop")
    add(db, "retired_type", "queued", created=now - timedelta(minutes=3))
    db.execute("delete from public.job_types where name = 'retired_type'")

    rows = {r["queue"]: r for r in view(db, "queue_depth")}
    assert {"sdxl", "wan", "chat", "demo", "gpu2"} <= set(rows)
    demo = rows["demo"]
    assert (demo["queued"], demo["scheduled"], demo["processing"]) == (3, 1, 2)
    assert 600 <= demo["oldest_queued_age_s"] < 660  # the 10-minute-old job; the scheduled one is not due
    assert (rows["sdxl"]["queued"], rows["sdxl"]["processing"], rows["sdxl"]["oldest_queued_age_s"]) == (0, 1, None)
    assert (rows["wan"]["queued"], rows["wan"]["processing"]) == (0, 0)
    assert rows["gpu2"]["queued"] == 1 and 180 <= rows["gpu2"]["oldest_queued_age_s"] < 240


# --- stale workers ------------------------------------------------------------------------------


def _worker(db: Sql, worker_id: str, state: str, heartbeat_age: timedelta) -> None:
    db.execute("insert into public.workers (id, host, pid, queues, state, heartbeat_at)"
               " values (%s, 'gpu-box', 42, '{demo}', %s, now() - %s)", (worker_id, state, heartbeat_age))


def test_stale_workers_and_the_jobs_they_hold(db: Sql, now: datetime) -> None:
    _worker(db, "w-fresh", "busy", timedelta(seconds=2))
    _worker(db, "w-stale", "busy", timedelta(minutes=5))
    _worker(db, "w-quiet", "idle", timedelta(minutes=2))
    _worker(db, "w-stopped", "stopped", timedelta(hours=1))
    started = now - timedelta(minutes=6)
    fresh_job = add(db, "simulate", "processing", created=started, started=started, worker="w-fresh")
    held = sorted(add(db, "simulate", "processing", created=started, started=started, worker="w-stale")
                  for _ in range(2))
    done(db, "simulate", "completed", now - timedelta(minutes=5), worker="w-stale")  # finished: not held

    rows = view(db, "workers_stale", order="heartbeat_at, job_id")
    assert [(r["worker_id"], r["job_id"]) for r in rows] == [
        ("w-stale", held[0]), ("w-stale", held[1]), ("w-quiet", None)]
    assert rows[0]["state"] == "busy" and rows[0]["job_type"] == "simulate" and rows[0]["attempts"] == 1
    assert 300 <= rows[0]["heartbeat_age_s"] < 360
    assert fresh_job not in {r["job_id"] for r in rows}

    def stale(threshold: str) -> list[str]:
        found = db.execute("select distinct worker_id from public.stale_workers(%s::interval) order by 1",
                           (threshold,)).fetchall()
        return [r["worker_id"] for r in found]

    assert stale("3 minutes") == ["w-stale"]
    assert stale("1 second") == ["w-fresh", "w-quiet", "w-stale"]
    assert stale("10 minutes") == []


# --- per-user usage -----------------------------------------------------------------------------


def test_user_usage_counts_gpu_seconds_and_asset_bytes_including_archive(db: Sql, now: datetime) -> None:
    alice, bob = new_user(db), new_user(db)
    recent = now - timedelta(hours=1)
    done(db, "simulate", "completed", recent, run=10, user=alice,
         result={"assets": [{"path": "a/0.png", "size": 100}, {"path": "a/1.png", "size": 250}]})
    done(db, "simulate", "completed", recent, run=5, user=alice,
         result={"assets": [{"size": 50}, {"size": "big"}, {"path": "no size"}], "text": "hi"})
    done(db, "simulate", "failed", recent, run=2, user=alice, error_code="OOM_ERROR")
    add(db, "simulate", "canceled", created=recent, finished=recent, user=alice)  # never ran
    add(db, "simulate", "queued", created=now, user=alice)
    done(db, "simulate", "completed", now - timedelta(days=40), run=20, user=alice, result={"assets": [{"size": 1000}]})
    done(db, "simulate", "completed", recent, run=3, user=bob, result={"assets": [{"size": 7}]})
    done(db, "simulate", "completed", recent, run=4)  # a service job
    assert db.execute("select public.prune_jobs() as n").fetchone()["n"] == 1  # the 40-day-old one

    rows = {r["user_id"]: r for r in view(db, "user_usage")}
    a = rows[alice]
    assert (a["jobs"], a["completed"], a["failed"], a["canceled"], a["active"]) == (6, 3, 1, 1, 1)
    assert a["gpu_seconds"] == pytest.approx(10 + 5 + 2 + 20)
    assert a["asset_bytes"] == 100 + 250 + 50 + 1000
    assert a["last_job_at"] == now and a["first_job_at"] < now - timedelta(days=40)
    b = rows[bob]
    assert (b["jobs"], b["gpu_seconds"], b["asset_bytes"]) == (1, pytest.approx(3), 7)
    assert rows[None]["jobs"] == 1 and rows[None]["gpu_seconds"] == pytest.approx(4)


# --- retention ----------------------------------------------------------------------------------


def test_prune_archives_only_old_terminal_jobs(db: Sql, now: datetime) -> None:
    old = [
        done(db, "simulate", "completed", now - timedelta(days=40), result={"assets": [{"size": 1}]}),
        done(db, "simulate", "failed", now - timedelta(days=35), error_code="OOM_ERROR"),
        add(db, "simulate", "canceled", created=now - timedelta(days=31), finished=now - timedelta(days=31)),
    ]
    kept = [
        done(db, "simulate", "completed", now - timedelta(days=29)),
        add(db, "simulate", "queued", created=now - timedelta(days=40)),  # old but not finished
        add(db, "simulate", "processing", created=now - timedelta(days=40), started=now - timedelta(days=40)),
    ]
    before = {r["id"]: r for r in db.execute("select * from public.jobs").fetchall()}

    assert db.execute("select public.prune_jobs() as n").fetchone()["n"] == 3
    remaining = {r["id"] for r in db.execute("select id from public.jobs").fetchall()}
    assert remaining == set(kept)
    archived = {r["id"]: r for r in db.execute("select * from public.jobs_archive").fetchall()}
    assert set(archived) == set(old)
    for job_id in old:
        row, original = archived[job_id], before[job_id]
        assert (row["status"], row["job_type"], row["finished_at"], row["started_at"]) == (
            original["status"], original["job_type"], original["finished_at"], original["started_at"])
        assert row["job"]["payload"] == original["payload"] and row["job"]["error"] == original["error"]
        assert row["job"]["result"] == original["result"] and row["job"]["errors"] == original["errors"]
    assert db.execute("select public.prune_jobs() as n").fetchone()["n"] == 0


def test_prune_can_delete_instead_of_archiving(db: Sql, now: datetime) -> None:
    gone = done(db, "simulate", "completed", now - timedelta(days=3))
    kept = done(db, "simulate", "completed", now - timedelta(hours=12))
    n = db.execute("select public.prune_jobs(interval '1 day', archive => false) as n").fetchone()["n"]
    assert n == 1
    assert [r["id"] for r in db.execute("select id from public.jobs").fetchall()] == [kept]
    assert db.execute("select count(*) as n from public.jobs_archive").fetchone()["n"] == 0
    assert gone != kept


def test_prune_works_in_bounded_batches(db: Sql, now: datetime) -> None:
    for day in range(7):
        done(db, "simulate", "completed", now - timedelta(days=31 + day))

    def prune(**kwargs: Any) -> int:
        args = ", ".join(f"{k} => {v}" for k, v in kwargs.items())
        return db.execute(f"select public.prune_jobs({args}) as n").fetchone()["n"]

    assert prune(batch_size=3, max_batches=2) == 6  # one call stops after two batches
    oldest_left = db.execute("select finished_at from public.jobs").fetchall()
    assert len(oldest_left) == 1 and oldest_left[0]["finished_at"] > now - timedelta(days=32)  # oldest went first
    assert prune(batch_size=3, max_batches=2) == 1
    for day in range(5):
        done(db, "simulate", "completed", now - timedelta(days=31 + day))
    assert prune(batch_size=2, max_batches="null") == 5  # NULL: until done


def test_prune_rejects_nonsense_arguments(db: Sql) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("select public.prune_jobs(interval '-1 day')")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("select public.prune_jobs(batch_size => 0)")


# --- who may read them --------------------------------------------------------------------------


def test_views_are_security_invoker(db: Sql) -> None:
    rows = db.execute("select relname, reloptions from pg_class where relname = any(%s) and relkind = 'v'",
                      (VIEWS,)).fetchall()
    assert {r["relname"]: r["reloptions"] for r in rows} == {v: ["security_invoker=true"] for v in VIEWS}


def as_role(db: Sql, role: str, query: str) -> list[Row]:
    """A request as PostgREST runs it; the transaction rolls back if the statement fails."""
    claims = {"role": role} if role != "authenticated" else {"role": role, "sub": str(uuid.uuid4())}
    with db.transaction():
        db.execute("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                   (role, json.dumps(claims)))
        return db.execute(query).fetchall()


@pytest.mark.parametrize("name", VIEWS)
def test_views_are_for_the_service_role_only(db: Sql, now: datetime, name: str) -> None:
    done(db, "simulate", "completed", now - timedelta(minutes=5))
    as_role(db, "service_role", f"select * from public.{name}")
    for role in ("anon", "authenticated"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(db, role, f"select * from public.{name}")


def test_service_role_sees_every_row_and_api_roles_cannot_prune(db: Sql, now: datetime) -> None:
    done(db, "simulate", "completed", now - timedelta(minutes=5), user=new_user(db))
    assert as_role(db, "service_role", "select sum(completed) as n from public.job_throughput_hourly") == [{"n": 1}]
    assert as_role(db, "service_role", "select count(*) as n from public.stale_workers('1 second')") == [{"n": 0}]
    assert as_role(db, "service_role", "select public.prune_jobs(interval '1 minute') as n") == [{"n": 1}]
    for role in ("anon", "authenticated"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(db, role, "select public.prune_jobs()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role(db, role, "select * from public.stale_workers()")
