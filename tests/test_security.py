"""Row Level Security, column privileges and quotas, exercised the way PostgREST runs a request.

PostgREST opens a transaction per request, runs `set_config('role', <role>, true)` (SET LOCAL
ROLE) and `set_config('request.jwt.claims', <claims json>, true)`, then the statement. `Api`
below does exactly that on a real Postgres. Every attack runs twice: on the database as the
bootstrap leaves it, and on one where, as on Supabase, new public tables and functions are
granted to anon and authenticated by default, so the migration's revokes are what stops them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from rich.console import Console

from tests.conftest import PostgresServer
from worker import db
from worker.config import Settings
from worker.queue import JobQueue, Outcome

SUPABASE_TEMPLATE = "ourvidz_template_supabase_grants"

# What a Supabase project does for every table and function `postgres` creates in public.
SUPABASE_DEFAULT_PRIVILEGES = [
    "alter default privileges in schema public grant all on tables to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on functions to anon, authenticated, service_role",
    "alter default privileges in schema public grant all on sequences to anon, authenticated, service_role",
]

Row = dict[str, Any]


class Api:
    """One PostgREST-style request per call, each in its own transaction."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)

    def request(self, role: str, sub: uuid.UUID | None, query: str, params: Any = None) -> list[Row]:
        claims: dict[str, Any] = {"role": role}
        if sub is not None:
            claims["sub"] = str(sub)
        with self.conn.transaction():
            self.conn.execute("select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                              (role, json.dumps(claims)))
            cur = self.conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def as_user(self, sub: uuid.UUID | None, query: str, params: Any = None) -> list[Row]:
        return self.request("authenticated", sub, query, params)

    def anon(self, query: str, params: Any = None) -> list[Row]:
        return self.request("anon", None, query, params)

    def close(self) -> None:
        self.conn.close()


@dataclass
class World:
    url: str
    sql: psycopg.Connection[Row]
    api: Api
    alice: uuid.UUID
    bob: uuid.UUID
    alice_queued: uuid.UUID
    alice_processing: uuid.UUID
    alice_cancelling: uuid.UUID  # processing, cancel already requested
    alice_done: uuid.UUID
    bob_queued: uuid.UUID
    bob_processing: uuid.UUID
    service_job: uuid.UUID

    def jobs(self) -> list[Row]:
        return self.sql.execute("select * from public.jobs order by id").fetchall()

    def set_quota(self, job_type: str | None = None, **limits: int | None) -> None:
        columns = ", ".join(limits)
        updates = ", ".join(f"{c} = excluded.{c}" for c in limits)
        self.sql.execute(
            f"insert into public.job_quotas (job_type, {columns}) values (%s, {', '.join(['%s'] * len(limits))})"
            f" on conflict (job_type) do update set {updates}, updated_at = now()",
            (job_type, *limits.values()),
        )

    def submit(self, user: uuid.UUID, job_type: str = "simulate", payload: dict[str, Any] | None = None,
               priority: int | None = None) -> Row:
        """What `supabase.from('jobs').insert({...}).select().single()` sends."""
        if priority is None:
            rows = self.api.as_user(user, "insert into public.jobs (job_type, payload) values (%s, %s) returning *",
                                    (job_type, Jsonb(payload or {"prompt": "a cat"})))
        else:
            rows = self.api.as_user(
                user, "insert into public.jobs (job_type, payload, priority) values (%s, %s, %s) returning *",
                (job_type, Jsonb(payload or {"prompt": "a cat"}), priority))
        return rows[0]


def _new_user(sql: psycopg.Connection[Row], email: str) -> uuid.UUID:
    return sql.execute("insert into auth.users (email) values (%s) returning id", (email,)).fetchone()["id"]


def _insert_job(sql: psycopg.Connection[Row], user: uuid.UUID | None, state: str, cancel: bool = False) -> uuid.UUID:
    """A row inserted in its final state, as the worker would have left it."""
    columns: dict[str, str] = {
        "queued": {},
        "processing": {"status": "'processing'", "worker_id": "'w-1'", "attempts": "1", "started_at": "now()",
                       "lease_expires_at": "now() + interval '1 hour'", "progress": "40", "stage": "'step 4'"},
        "completed": {"status": "'completed'", "worker_id": "'w-1'", "attempts": "1", "started_at": "now()",
                      "finished_at": "now()", "progress": "100", "result": "'{\"assets\": []}'"},
    }[state]
    # an hour old, so that they stay out of the per-minute quota's window
    names = ", ".join(["user_id", "job_type", "payload", "cancel_requested", "created_at", *columns])
    values = ", ".join(["%s", "'simulate'", "'{\"prompt\": \"x\"}'", "%s", "now() - interval '1 hour'",
                        *columns.values()])
    return sql.execute(f"insert into public.jobs ({names}) values ({values}) returning id",
                       (user, cancel)).fetchone()["id"]


@pytest.fixture(scope="session")
def supabase_template(pg_server: PostgresServer) -> str:
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SUPABASE_TEMPLATE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {SUPABASE_TEMPLATE}")
    url = pg_server.database_url(SUPABASE_TEMPLATE)
    with db.connect(url) as conn, conn.transaction():
        for statement in db.split_statements(Settings().bootstrap_file.read_text()):
            conn.execute(statement.encode())
        for statement in SUPABASE_DEFAULT_PRIVILEGES:
            conn.execute(statement)
    db.migrate(url)
    return SUPABASE_TEMPLATE


@contextmanager
def _clone(pg_server: PostgresServer, template: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server.url) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield pg_server.database_url(name)
    finally:
        with db.connect(pg_server.url) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _world(url: str) -> Iterator[World]:
    with db.connect(url) as sql:
        api = Api(url)
        alice, bob = _new_user(sql, "alice@example.com"), _new_user(sql, "bob@example.com")
        sql.execute("insert into public.job_types (name, queue, handler, enabled)"
                    " values ('retired', 'demo', 'simulate', false)")
        # simulate is service-only by default (tests/test_hostile.py); this deployment opens it to users,
        # as an operator may, so the attacks below need no model
        sql.execute("update public.job_types set users_may_submit = true where name = 'simulate'")
        world = World(
            url=url, sql=sql, api=api, alice=alice, bob=bob,
            alice_queued=_insert_job(sql, alice, "queued"),
            alice_processing=_insert_job(sql, alice, "processing"),
            alice_cancelling=_insert_job(sql, alice, "processing", cancel=True),
            alice_done=_insert_job(sql, alice, "completed"),
            bob_queued=_insert_job(sql, bob, "queued"),
            bob_processing=_insert_job(sql, bob, "processing"),
            service_job=_insert_job(sql, None, "queued"),
        )
        try:
            yield world
        finally:
            api.close()


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    yield from _world(database_url)


# One world per database flavor for the whole attack table: a refused request changes nothing
# (each test asserts so), and one that got through has failed its own test already.
@pytest.fixture(scope="module", params=["bootstrap", "supabase-default-grants"])
def any_world(request: pytest.FixtureRequest, pg_server: PostgresServer, template_db: str) -> Iterator[World]:
    template = template_db if request.param == "bootstrap" else request.getfixturevalue("supabase_template")
    with _clone(pg_server, template) as url:
        yield from _world(url)


# --- the attacks ------------------------------------------------------------------------------

DENIED = "permission denied"  # a privilege is missing: nothing is even looked at
RLS = "row-level security"  # the row fails a policy's WITH CHECK
INVISIBLE = "invisible"  # the statement runs but the policy hides every target row


@dataclass(frozen=True)
class Attack:
    name: str
    query: str  # format fields: the World's attributes
    expect: str  # DENIED, RLS, INVISIBLE, or an SQLSTATE
    role: str = "authenticated"
    who: str | None = "alice"


SERVER_COLUMNS = {
    # doubled braces: the queries go through str.format
    "status": "'completed'", "result": "'{{\"assets\": []}}'", "error": "'{{\"code\": \"X\"}}'", "errors": "'[]'",
    "attempts": "0", "max_attempts": "20", "worker_id": "'w-evil'", "progress": "100", "stage": "'done'",
    "lease_expires_at": "now()", "run_at": "now() - interval '1 year'", "started_at": "now()",
    "finished_at": "now()", "created_at": "now()", "updated_at": "now()", "queue": "'sdxl'",
    "cancel_requested": "false", "id": "gen_random_uuid()",
}

ATTACKS = [
    Attack("read another user's job", "select * from public.jobs where id = '{bob_queued}'", INVISIBLE),
    Attack("list every job", "select * from public.jobs where user_id is distinct from '{alice}'", INVISIBLE),
    Attack("read a service job", "select * from public.jobs where id = '{service_job}'", INVISIBLE),
    Attack("complete another user's job",
           "update public.jobs set status = 'completed', result = '{{}}' where id = '{bob_processing}' returning id",
           DENIED),
    Attack("fail another user's job", "update public.jobs set status = 'failed' where id = '{bob_queued}' returning id",
           DENIED),
    Attack("cancel another user's job",
           "update public.jobs set cancel_requested = true where id = '{bob_queued}' returning id", INVISIBLE),
    Attack("cancel every job", "update public.jobs set cancel_requested = true where user_id <> '{alice}' returning id",
           INVISIBLE),
    Attack("forge own job completed",
           "update public.jobs set status = 'completed' where id = '{alice_processing}' returning id", DENIED),
    Attack("set own result", "update public.jobs set result = '{{\"assets\": []}}' where id = '{alice_processing}'",
           DENIED),
    Attack("set own progress", "update public.jobs set progress = 100 where id = '{alice_processing}'", DENIED),
    Attack("steal own job's lease", "update public.jobs set worker_id = 'w-evil' where id = '{alice_processing}'",
           DENIED),
    Attack("raise own priority", "update public.jobs set priority = 100 where id = '{alice_queued}'", DENIED),
    Attack("give own job away", "update public.jobs set user_id = '{bob}' where id = '{alice_queued}'", DENIED),
    Attack("requeue own finished job",
           "update public.jobs set status = 'queued' where id = '{alice_done}' returning id", DENIED),
    Attack("withdraw a cancel request",
           "update public.jobs set cancel_requested = false where id = '{alice_cancelling}' returning id", "23514"),
    Attack("cancel own finished job",
           "update public.jobs set cancel_requested = true where id = '{alice_done}' returning id", INVISIBLE),
    Attack("delete own job", "delete from public.jobs where id = '{alice_queued}' returning id", DENIED),
    Attack("delete another user's job", "delete from public.jobs where id = '{bob_queued}'", DENIED),
    Attack("truncate jobs", "truncate public.jobs cascade", DENIED),
    Attack("insert as another user",
           "insert into public.jobs (user_id, job_type, payload) values ('{bob}', 'simulate', '{{}}') returning id",
           RLS),
    Attack("insert an ownerless job",
           "insert into public.jobs (user_id, job_type, payload) values (null, 'simulate', '{{}}') returning id", RLS),
    Attack("insert without a signed-in user",
           "insert into public.jobs (job_type, payload) values ('simulate', '{{}}') returning id", RLS, who=None),
    *[
        Attack(f"insert with {column} set",
               f"insert into public.jobs (job_type, payload, {column}) values ('simulate', '{{{{}}}}', {value})"
               " returning id", DENIED)
        for column, value in SERVER_COLUMNS.items()
    ],
    Attack("insert a completed job with its result",
           "insert into public.jobs (job_type, payload, status, result, finished_at)"
           " values ('simulate', '{{}}', 'completed', '{{}}', now()) returning id", DENIED),
    Attack("insert an unknown job type",
           "insert into public.jobs (job_type, payload) values ('video_ultra', '{{}}') returning id", "OVTYP"),
    Attack("insert a disabled job type",
           "insert into public.jobs (job_type, payload) values ('retired', '{{}}') returning id", "OVTYP"),
    Attack("escalate priority", "insert into public.jobs (job_type, payload, priority) values ('simulate', '{{}}', 1)",
           "OVQTA"),
    Attack("escalate priority to the column maximum",
           "insert into public.jobs (job_type, payload, priority) values ('simulate', '{{}}', 100)", "OVQTA"),
    Attack("jump the queue at priority 10",
           "insert into public.jobs (job_type, payload, priority) values ('simulate', '{{}}', 10)", "OVQTA"),
    Attack("anon reads jobs", "select * from public.jobs", DENIED, role="anon", who=None),
    Attack("anon inserts a job", "insert into public.jobs (job_type, payload) values ('simulate', '{{}}')", DENIED,
           role="anon", who=None),
    Attack("anon cancels a job", "update public.jobs set cancel_requested = true where id = '{alice_queued}'",
           DENIED, role="anon", who=None),
    Attack("anon reads workers", "select * from public.workers", DENIED, role="anon", who=None),
    Attack("anon reads a disabled job type", "select * from public.job_types where name = 'retired'", INVISIBLE,
           role="anon", who=None),
    Attack("anon edits job types", "update public.job_types set enabled = true", DENIED, role="anon", who=None),
    Attack("anon reads its limits", "select * from public.job_limits('simulate')", DENIED, role="anon", who=None),
    Attack("user reads a disabled job type", "select * from public.job_types where name = 'retired'", INVISIBLE),
    Attack("user enables a job type", "update public.job_types set enabled = true where name = 'retired'", DENIED),
    Attack("user registers a job type",
           "insert into public.job_types (name, queue, handler) values ('mine', 'sdxl', 'sdxl')", DENIED),
    Attack("user reads workers", "select * from public.workers", DENIED),
    Attack("user registers a worker", "insert into public.workers (id, host) values ('w-evil', 'evil')", DENIED),
    Attack("user reads quotas", "select * from public.job_quotas", DENIED),
    Attack("user lifts its quota", "update public.job_quotas set max_active_jobs = null", DENIED),
    Attack("user reads the archive", "select * from public.jobs_archive", DENIED),
    Attack("user prunes jobs", "select public.prune_jobs(interval '0 seconds', false)", DENIED),
    Attack("anon prunes jobs", "select public.prune_jobs(interval '0 seconds', false)", DENIED, role="anon",
           who=None),
    Attack("user lists stale workers", "select * from public.stale_workers()", DENIED),
    *[
        Attack(f"{role} reads dashboard {name}", f"select * from public.{name}", DENIED, role=role,
               who="alice" if role == "authenticated" else None)
        for name in ("job_throughput_hourly", "job_latency_24h", "job_failure_rates_24h", "queue_depth",
                     "workers_stale", "user_usage")
        for role in ("anon", "authenticated")
    ],
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(any_world: World, attack: Attack) -> None:
    w = any_world
    before = w.jobs()
    query = attack.query.format(**vars(w))
    sub = getattr(w, attack.who) if attack.who else None
    if attack.expect == INVISIBLE:
        assert w.api.request(attack.role, sub, query) == []
    else:
        with pytest.raises(psycopg.Error) as caught:
            w.api.request(attack.role, sub, query)
        err = caught.value
        if attack.expect == DENIED:
            assert err.sqlstate == "42501" and DENIED in str(err), err
        elif attack.expect == RLS:
            assert err.sqlstate == "42501" and RLS in str(err), err
        else:
            assert err.sqlstate == attack.expect, err
    assert w.jobs() == before


# --- quotas -------------------------------------------------------------------------------------


def _refusal(call: Callable[[], Any]) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        call()
    return caught.value


def test_active_jobs_quota_refuses_with_a_message_to_show(world: World) -> None:
    world.set_quota(max_active_jobs=4)  # alice already has 3 active jobs
    world.submit(world.alice)
    err = _refusal(lambda: world.submit(world.alice))
    assert err.sqlstate == "OVQTA"
    assert err.diag.message_primary == "You already have 4 jobs queued or running; the limit is 4."
    assert err.diag.message_hint == "Wait for a job to finish, or cancel one."
    assert json.loads(err.diag.message_detail or "") == {
        "quota": "max_active_jobs", "limit": 4, "current": 4, "job_type": None}
    # per user: bob is not held back by alice's jobs
    assert world.submit(world.bob)["status"] == "queued"
    # a finished or canceled job frees a place
    world.api.as_user(world.alice, "update public.jobs set cancel_requested = true where id = %s",
                      (world.alice_queued,))
    assert world.submit(world.alice)["status"] == "queued"


def test_quotas_do_not_apply_to_the_worker_or_service(world: World, queue: JobQueue) -> None:
    world.set_quota(max_active_jobs=3, max_jobs_per_minute=3, max_prompt_chars=5)
    job_id = queue.enqueue("simulate", {"prompt": "longer than five"}, user_id=world.alice, priority=50)
    assert queue.get_job(job_id)["status"] == "queued"
    # the same request from alice herself is refused
    assert _refusal(lambda: world.submit(world.alice, payload={"prompt": "x"})).sqlstate == "OVQTA"


def test_per_type_active_quota_counts_only_that_type(world: World) -> None:
    world.set_quota("chat_conversation", max_active_jobs=1)
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    world.submit(world.alice, "chat_conversation", chat)
    err = _refusal(lambda: world.submit(world.alice, "chat_conversation", chat))
    assert err.sqlstate == "OVQTA"
    assert err.diag.message_primary == "You already have 1 chat_conversation jobs queued or running; the limit is 1."
    assert json.loads(err.diag.message_detail or "")["job_type"] == "chat_conversation"
    assert world.submit(world.alice, "simulate")["status"] == "queued"  # the global limit (10) still allows


def test_per_minute_quota_then_the_window_slides(world: World) -> None:
    world.set_quota(max_jobs_per_minute=2, max_active_jobs=None)
    first = world.submit(world.alice)
    world.submit(world.alice)
    err = _refusal(lambda: world.submit(world.alice))
    assert err.sqlstate == "OVQTA"
    assert err.diag.message_primary == "Too many requests: at most 2 jobs per minute."
    assert json.loads(err.diag.message_detail or "")["quota"] == "max_jobs_per_minute"
    world.sql.execute("update public.jobs set created_at = now() - interval '61 seconds'"
                      " where user_id = %s and created_at > now() - interval '1 minute'", (world.alice,))
    assert world.submit(world.alice)["id"] != first["id"]


def test_per_type_rate_quota(world: World) -> None:
    world.set_quota("video_fast", max_jobs_per_minute=1)
    world.submit(world.alice, "video_fast", {"prompt": "waves"})
    err = _refusal(lambda: world.submit(world.alice, "video_fast", {"prompt": "waves"}))
    assert err.diag.message_primary == "Too many requests: at most 1 video_fast jobs per minute."
    assert world.submit(world.alice, "image_fast", {"prompt": "waves"})["status"] == "queued"


def test_rows_of_one_statement_count_against_each_other(world: World) -> None:
    world.set_quota(max_active_jobs=5)  # alice has 3 active; a batch of 3 would make 6
    err = _refusal(lambda: world.api.as_user(
        world.alice, "insert into public.jobs (job_type, payload) select 'simulate', '{}' from generate_series(1, 3)"))
    assert err.sqlstate == "OVQTA"
    count = world.sql.execute("select count(*) as n from public.jobs where user_id = %s", (world.alice,)).fetchone()
    assert count["n"] == 4


@pytest.mark.parametrize(
    ("job_type", "payload", "quota"),
    [
        ("simulate", {"prompt": "x" * 1001}, "max_prompt_chars"),
        ("sdxl_image_fast", {"prompt": "a cat", "negative_prompt": "x" * 1001}, "max_prompt_chars"),
        ("chat_conversation", {"messages": [{"role": "user", "content": "x" * 32001}]}, "max_prompt_chars"),
        ("chat_roleplay", {"message": "hi", "conversation_history": [{"sender": "user", "content": "x" * 32001}]},
         "max_prompt_chars"),
        ("simulate", {"prompt": "a cat", "config": {"pad": "x" * 70000}}, "max_payload_bytes"),
        ("chat_generate", {"messages": [{"role": "user", "content": "x" * 30000}] * 9}, "max_payload_bytes"),
    ],
    ids=["prompt", "negative_prompt", "chat_message", "chat_history", "payload", "chat_payload"],
)
def test_size_limits(world: World, job_type: str, payload: dict[str, Any], quota: str) -> None:
    err = _refusal(lambda: world.submit(world.alice, job_type, payload))
    assert err.sqlstate == "OVQTA"
    detail = json.loads(err.diag.message_detail or "")
    assert detail["quota"] == quota and detail["current"] > detail["limit"]


def test_sizes_within_limits_are_accepted(world: World) -> None:
    assert world.submit(world.alice, "simulate", {"prompt": "x" * 1000})["status"] == "queued"
    # chat types allow longer texts than an image prompt (their own job_quotas rows)
    chat = {"messages": [{"role": "user", "content": "x" * 5000}] * 4}
    assert world.submit(world.alice, "chat_conversation", chat)["status"] == "queued"
    assert world.submit(world.alice, "simulate", {"prompt": "a cat"}, priority=-10)["priority"] == -10


def test_concurrent_inserts_cannot_overshoot(world: World) -> None:
    """Eight requests at once, each holding its transaction open a while after inserting."""
    world.set_quota(max_active_jobs=6)  # alice has 3 active: 3 places left
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def request() -> None:
        with psycopg.connect(world.url, autocommit=True) as conn:
            barrier.wait()
            try:
                with conn.transaction():
                    conn.execute("select set_config('role', 'authenticated', true),"
                                 " set_config('request.jwt.claims', %s, true)",
                                 (json.dumps({"sub": str(world.alice), "role": "authenticated"}),))
                    conn.execute("insert into public.jobs (job_type, payload) values ('simulate', '{}')")
                    time.sleep(0.2)
                outcomes.append("ok")
            except psycopg.Error as err:
                outcomes.append(err.sqlstate or "?")

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["OVQTA"] * 5 + ["ok"] * 3
    active = world.sql.execute("select count(*) as n from public.jobs where user_id = %s"
                               " and status in ('queued', 'processing')", (world.alice,)).fetchone()["n"]
    assert active == 6


def test_limits_are_readable_by_signed_in_users(world: World) -> None:
    chat = world.api.as_user(world.alice, "select * from public.job_limits('chat_conversation')")
    assert chat == [{"max_active_jobs": 10, "max_jobs_per_minute": 30, "type_max_active_jobs": None,
                     "type_max_jobs_per_minute": None, "max_prompt_chars": 32000, "max_payload_bytes": 262144,
                     "min_priority": -100, "max_priority": 0}]
    image = world.api.as_user(world.alice, "select max_prompt_chars from public.job_limits('sdxl_image_fast')")
    assert image == [{"max_prompt_chars": 1000}]


def test_no_global_row_means_no_limits(world: World) -> None:
    world.sql.execute("delete from public.job_quotas")
    for _ in range(12):
        world.submit(world.alice, payload={"prompt": "x" * 2000})
    assert world.submit(world.alice, priority=100)["priority"] == 100


def test_quota_counts_are_served_by_indexes(world: World) -> None:
    counts = {
        "jobs_user_active_idx": "select count(*) from public.jobs where user_id = %s"
                                " and status in ('queued', 'processing')",
        "jobs_user_created_idx": "select count(*) from public.jobs where user_id = %s"
                                 " and created_at > now() - interval '1 minute'",
    }
    for index, query in counts.items():
        with world.sql.transaction():
            world.sql.execute("set local enable_seqscan = off")
            plan = "\n".join(r["QUERY PLAN"] for r in world.sql.execute("explain " + query, (world.alice,)))
        assert index in plan, plan


# --- allowed paths -------------------------------------------------------------------------------


def test_user_inserts_own_job_and_server_columns_get_their_defaults(world: World) -> None:
    row = world.submit(world.alice, "sdxl_image_fast", {"prompt": "a cat"})
    assert row["user_id"] == world.alice
    assert (row["status"], row["queue"], row["attempts"], row["max_attempts"], row["priority"]) == (
        "queued", "sdxl", 0, 3, 0)
    assert row["worker_id"] is None and row["result"] is None and row["error"] is None
    assert world.submit(world.alice, priority=-7)["priority"] == -7


def test_user_reads_only_own_jobs(world: World) -> None:
    rows = world.api.as_user(world.alice, "select id from public.jobs")
    assert {r["id"] for r in rows} == {world.alice_queued, world.alice_processing, world.alice_cancelling,
                                       world.alice_done}
    assert {r["id"] for r in world.api.as_user(world.bob, "select id from public.jobs")} == {
        world.bob_queued, world.bob_processing}


def test_user_cancels_own_queued_job_and_it_is_canceled(world: World) -> None:
    rows = world.api.as_user(world.alice, "update public.jobs set cancel_requested = true where id = %s returning *",
                             (world.alice_queued,))
    assert len(rows) == 1
    assert rows[0]["status"] == "canceled" and rows[0]["cancel_requested"] and rows[0]["finished_at"] is not None


def test_user_cancels_own_processing_job_and_the_worker_sees_it(world: World, queue: JobQueue) -> None:
    rows = world.api.as_user(world.alice, "update public.jobs set cancel_requested = true where id = %s returning *",
                             (world.alice_processing,))
    assert [(r["status"], r["cancel_requested"]) for r in rows] == [("processing", True)]
    worker = JobQueue(queue.pool, worker_id="w-1")
    assert worker.heartbeat([world.alice_processing], "busy").cancel_requested == {world.alice_processing}


def test_job_types_are_readable_when_enabled(world: World) -> None:
    for rows in (world.api.anon("select name from public.job_types"),
                 world.api.as_user(world.alice, "select name from public.job_types")):
        names = {r["name"] for r in rows}
        assert {"simulate", "sdxl_image_fast", "chat_conversation"} <= names and "retired" not in names


def test_worker_claims_and_finishes_user_jobs(world: World, queue: JobQueue) -> None:
    world.sql.execute("update public.jobs set status = 'canceled', finished_at = now() where status = 'queued'")
    job = world.submit(world.alice, "simulate", {"prompt": "for the worker"})
    worker = JobQueue(queue.pool, worker_id="w-2", lease_seconds=30)
    claimed = worker.claim(["simulate"], 10)
    assert [j.id for j in claimed] == [job["id"]] and claimed[0].user_id == world.alice
    assert worker.report_progress(job["id"], 50, "halfway") is False
    assert worker.finish([Outcome(job["id"], "completed", result={"assets": [{"size": 3}]})]) == {
        job["id"]: "completed"}
    seen = world.api.as_user(world.alice, "select status, progress, result from public.jobs where id = %s",
                             (job["id"],))
    assert seen == [{"status": "completed", "progress": 100, "result": {"assets": [{"size": 3}]}}]


def test_demo_still_works(database_url: str, tmp_path: Path) -> None:
    from worker.demo import run_demo

    console = Console(file=io.StringIO(), width=200)
    assert run_demo(Settings(database_url=database_url, home=tmp_path / "home"), console, concurrency=2)
