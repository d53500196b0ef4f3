"""Users take turns (sql/migrations/*_fair_claim.sql): within a priority one user's backlog does not
hold another user's jobs behind all of it; an operator may cap the jobs of one user running at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import wait_status
from tests.support import ProbeHandler
from worker import db
from worker.queue import CLAIM_JOBS, JobQueue, Outcome

Sql = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def claimer(database_url: str) -> Iterator[JobQueue]:
    pool = db.make_pool(database_url, 2, name="claimer")
    yield JobQueue(pool, "fair-worker")
    pool.close()


@pytest.fixture
def users(sql: Sql) -> list[uuid.UUID]:
    sql.execute("insert into public.job_types (name, queue, handler) values ('fair', 'test', 'probe'),"
                " ('fair_b', 'test', 'probe')")
    return [sql.execute("insert into auth.users (email) values (%s) returning id",
                        (f"user{i}@example.com",)).fetchone()["id"] for i in range(6)]


# public.claim_jobs parameters for one job of type fair, without affinity (a worker id added per claim)
ONE_FAIR_JOB = {"job_types": ["fair"], "limit": 1, "affine_types": [], "window": 8, "aging_seconds": 300.0,
                "lease_seconds": 30.0}


def submit(queue: JobQueue, user: uuid.UUID | None, n: int = 1, job_type: str = "fair",
           priority: int = 0) -> list[uuid.UUID]:
    return [queue.enqueue(job_type, {"n": i}, user_id=user, priority=priority) for i in range(n)]


def claim_one_by_one(claimer: JobQueue, n: int, types: tuple[str, ...] = ("fair",)) -> list[uuid.UUID]:
    taken = []
    for _ in range(n):
        taken += [job.id for job in claimer.claim(list(types), 1)]
    return taken


def test_a_light_users_job_waits_for_one_job_of_the_heavy_user_not_all(queue, claimer, users):
    heavy, *light = users
    heavy_jobs = submit(queue, heavy, 30)
    light_jobs = [submit(queue, user)[0] for user in light]
    order = claim_one_by_one(claimer, 7)
    # the heavy user's first job was there first; then every light user's, then the heavy user's next
    assert order == [heavy_jobs[0], *light_jobs, heavy_jobs[1]]


def test_users_with_several_jobs_alternate(queue, claimer, users):
    a, b = users[:2]
    a_jobs, b_jobs = submit(queue, a, 3), submit(queue, b, 3)
    assert claim_one_by_one(claimer, 6) == [a_jobs[0], b_jobs[0], a_jobs[1], b_jobs[1], a_jobs[2], b_jobs[2]]


def test_turns_alternate_across_users_in_one_claim(queue, claimer, users):
    a, b = users[:2]
    a_jobs, b_jobs = submit(queue, a, 3), submit(queue, b, 3)
    got = [job.id for job in claimer.claim(["fair"], 6)]  # returned in claim order
    assert got == [a_jobs[0], b_jobs[0], a_jobs[1], b_jobs[1], a_jobs[2], b_jobs[2]]


def test_a_newcomer_joins_the_current_round(queue, claimer, users):
    heavy, newcomer = users[:2]
    heavy_jobs = submit(queue, heavy, 10)
    assert claim_one_by_one(claimer, 4) == heavy_jobs[:4]
    new_jobs = submit(queue, newcomer, 2)
    assert claim_one_by_one(claimer, 4) == [heavy_jobs[4], new_jobs[0], heavy_jobs[5], new_jobs[1]]


def test_service_jobs_are_one_user(queue, claimer, users):
    service = submit(queue, None, 3)
    user_job = submit(queue, users[0])[0]
    assert claim_one_by_one(claimer, 4) == [service[0], user_job, service[1], service[2]]


def test_priority_comes_before_turns(queue, claimer, users):
    heavy, light = users[:2]
    heavy_jobs = submit(queue, heavy, 5)
    urgent = submit(queue, heavy, 2, priority=5)
    light_job = submit(queue, light)[0]
    assert claim_one_by_one(claimer, 5) == [*urgent, heavy_jobs[0], light_job, heavy_jobs[1]]


def test_turns_span_job_types_of_one_user(queue, claimer, users):
    """A user's turns count all their queued jobs of a priority, whatever the type: one video and one
    image of the same user are that user's first and second turn."""
    a, b = users[:2]
    a_first = submit(queue, a, 1, "fair")[0]
    a_second = submit(queue, a, 1, "fair_b")[0]
    b_job = submit(queue, b, 1, "fair_b")[0]
    assert claim_one_by_one(claimer, 3, ("fair", "fair_b")) == [a_first, b_job, a_second]


def test_a_retried_job_keeps_its_turn(queue, claimer, users, sql):
    a, b = users[:2]
    a_jobs = submit(queue, a, 2)
    [first] = claimer.claim(["fair"], 1)
    b_job = submit(queue, b)[0]  # the head of the queue is a's second job, turn 1: b joins that round
    claimer.finish([Outcome(first.id, "queued", error={"code": "NETWORK_ERROR", "message": "x", "retryable": True})])
    turns = {r["id"]: r["turn"] for r in sql.execute("select id, turn from public.jobs").fetchall()}
    assert (turns[a_jobs[0]], turns[a_jobs[1]], turns[b_job]) == (0, 1, 1)
    # round 0 again for a (the retry), then round 1 for a and b: a's jobs fill a's turns in the
    # order they are due (the retry is due again only now)
    order = claim_one_by_one(claimer, 3)
    owners = {job_id: "a" for job_id in a_jobs} | {b_job: "b"}
    assert [owners[job_id] for job_id in order] == ["a", "a", "b"] and set(order) == {*a_jobs, b_job}


def test_cap_on_the_jobs_of_one_user_running_at_once(queue, claimer, users, sql):
    heavy, light = users[:2]
    sql.execute("update public.job_quotas set max_running_jobs = 2 where job_type is null")
    heavy_jobs = submit(queue, heavy, 5)
    light_jobs = submit(queue, light, 1)
    service = submit(queue, None, 3)  # not capped
    got = [job.id for job in claimer.claim(["fair"], 8)]
    assert got == [heavy_jobs[0], light_jobs[0], service[0], heavy_jobs[1], service[1], service[2]]
    assert claimer.claim(["fair"], 8) == []  # the heavy user is at the cap
    claimer.finish([Outcome(heavy_jobs[0], "completed", result={})])
    assert [job.id for job in claimer.claim(["fair"], 8)] == [heavy_jobs[2]]


def test_a_cap_holds_when_two_workers_claim_at_the_same_moment(queue, users, database_url, sql):
    """Every idle worker wakes on the same notify: a claim made while another has not committed yet
    must not count the user below the cap. Two real sessions, the first held open."""
    capped, other = users[:2]
    sql.execute("update public.job_quotas set max_running_jobs = 1 where job_type is null")
    capped_jobs = submit(queue, capped, 3)
    other_job = submit(queue, other)[0]
    with db.connect(database_url) as first, db.connect(database_url) as second:
        second_claim: list[Any] = []
        with first.transaction():
            taken = first.execute(CLAIM_JOBS, {**ONE_FAIR_JOB, "worker_id": "first"}).fetchall()
            assert [r["id"] for r in taken] == [capped_jobs[0]]
            thread = threading.Thread(target=lambda: second_claim.extend(
                second.execute(CLAIM_JOBS, {**ONE_FAIR_JOB, "worker_id": "second"}).fetchall()))
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # waits for the first claim: it would count capped as running none
        thread.join(10)
        assert [r["id"] for r in second_claim] == [other_job]  # capped is at the cap
    running = sql.execute("select count(*) as n from public.jobs where user_id = %s and status = 'processing'",
                          (capped,)).fetchone()
    assert running["n"] == 1


def test_a_capped_users_next_job_starts_when_their_running_one_ends(queue, start_worker, users, sql):
    """Passed over for the cap, the second job starts on the first's finish (a notify), not at the
    next poll (60 s here)."""
    user = users[0]
    sql.execute("update public.job_quotas set max_running_jobs = 1 where job_type is null")
    start_worker({"probe": ProbeHandler()}, queues=["test"], concurrency=2, poll_interval=60)
    first, second = (queue.enqueue("fair", {"sleep": 1.5}, user_id=user) for _ in range(2))
    done = wait_status(queue, first, "completed")
    started = wait_status(queue, second, "processing", "completed", timeout=10)
    assert started["started_at"] >= done["finished_at"]  # never both at once
    assert (started["started_at"] - done["finished_at"]).total_seconds() < 2


def test_claims_without_caps_do_not_wait_for_each_other(queue, users, database_url):
    first_user, second_user = users[:2]
    jobs = submit(queue, first_user) + submit(queue, second_user)
    with db.connect(database_url) as first, db.connect(database_url) as second:
        with first.transaction():
            taken = first.execute(CLAIM_JOBS, {**ONE_FAIR_JOB, "worker_id": "first"}).fetchall()
            second.execute("set statement_timeout = 2000")
            meanwhile = second.execute(CLAIM_JOBS, {**ONE_FAIR_JOB, "worker_id": "second"}).fetchall()
        assert {taken[0]["id"], meanwhile[0]["id"]} == set(jobs)


def test_cap_per_job_type(queue, claimer, users, sql):
    user = users[0]
    sql.execute("insert into public.job_quotas (job_type, max_running_jobs) values ('fair', 1)")
    fair_jobs = submit(queue, user, 3, "fair")
    other = submit(queue, user, 2, "fair_b")
    got = [job.id for job in claimer.claim(["fair", "fair_b"], 5)]
    assert got == [fair_jobs[0], other[0], other[1]]


def test_a_worker_runs_a_light_users_job_before_the_heavy_backlog(queue, start_worker, users, sql):
    """Through the worker loop: one job at a time, a heavy user's 12 jobs queued first."""
    heavy, light = users[:2]
    heavy_jobs = submit(queue, heavy, 12)
    light_job = submit(queue, light)[0]
    start_worker({"probe": ProbeHandler()}, queues=["test"], concurrency=1)
    wait_status(queue, light_job, "completed")
    started = sql.execute("select id from public.jobs where started_at is not null order by started_at").fetchall()
    assert [r["id"] for r in started][:2] == [heavy_jobs[0], light_job]
