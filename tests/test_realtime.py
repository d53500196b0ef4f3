"""Realtime: the change stream Supabase Realtime reads, the broadcast topic, and the frontend helpers.

The change-stream test starts its own Postgres (Debian's, with the wal2json plugin: the embedded
server has neither wal_level=logical nor the plugin) and reads a logical slot exactly as
Realtime's `realtime.list_changes` does. The other tests use the shared test server.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from tests.conftest import wait_for, wait_status
from worker import db
from worker.config import REPO_ROOT, Settings
from worker.handlers.base import builtin_handlers
from worker.loop import Worker
from worker.queue import JobQueue
from worker.storage import LocalStorage
from worker.watch import JobWatch, watch_backend, watch_supabase

REALTIME_DIR = REPO_ROOT / "realtime"
MIGRATION = REPO_ROOT / "sql" / "migrations" / "20261122002000_realtime.sql"
BROADCAST_KEYS = {"id", "job_type", "status", "progress", "stage", "result", "error", "attempts", "max_attempts",
                  "cancel_requested", "created_at", "started_at", "finished_at", "updated_at"}


# --- a Postgres with wal2json ------------------------------------------------------------


def _wal2json_bindir() -> Path | None:
    candidates = [os.environ["OURVIDZ_PG_BINDIR"]] if os.environ.get("OURVIDZ_PG_BINDIR") else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        bindir = Path(candidate)
        if not (bindir / "postgres").exists() or not (bindir / "pg_config").exists():
            continue
        libdir = subprocess.run([bindir / "pg_config", "--pkglibdir"], capture_output=True, text=True).stdout.strip()
        if (Path(libdir) / "wal2json.so").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def logical_pg() -> Iterator[str]:
    """URL of a fresh Postgres with wal_level=logical and wal2json, migrated; stopped at the end."""
    bindir = _wal2json_bindir()
    if bindir is None:
        pytest.skip("no Postgres with the wal2json plugin here (Debian: apt-get install postgresql-15-wal2json; "
                    "or set OURVIDZ_PG_BINDIR to a bin folder whose pkglibdir has wal2json.so)")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` system user to run initdb as")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="ourvidz-logical-pg-"))
    if run_as:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run([*run_as, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--locale=C", "--no-sync"], check=True, capture_output=True)
    port = 0
    for _attempt in range(3):
        port = _free_port()
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
                   " -c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8"
                   " -c fsync=off -c full_page_writes=off")
        started = subprocess.run([*run_as, bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "60",
                                  "-o", options, "start"], capture_output=True, text=True)
        if started.returncode == 0:
            break
    else:
        pytest.fail(f"Postgres with wal2json did not start: {(root / 'log').read_text()[-2000:]}")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        with db.connect(url) as conn:
            conn.execute("CREATE DATABASE ourvidz_logical")
        database_url = f"postgresql://postgres@127.0.0.1:{port}/ourvidz_logical"
        db.migrate(database_url)
        yield database_url
    finally:
        subprocess.run([*run_as, bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# The options Supabase Realtime passes (realtime.list_changes): the tables come from the
# publication, so a table missing from `supabase_realtime` is simply never streamed.
PUBLICATION = """
SELECT coalesce(string_agg(ppt.schemaname || '.' || ppt.tablename, ','), '') AS add_tables,
       concat_ws(',', CASE WHEN bool_or(pp.pubinsert) THEN 'insert' END,
                      CASE WHEN bool_or(pp.pubupdate) THEN 'update' END,
                      CASE WHEN bool_or(pp.pubdelete) THEN 'delete' END) AS actions
FROM pg_publication pp
LEFT JOIN pg_publication_tables ppt ON ppt.pubname = pp.pubname
WHERE pp.pubname = 'supabase_realtime'
"""
GET_CHANGES = """
SELECT data FROM pg_logical_slot_get_changes(
    %(slot)s, NULL, NULL,
    'include-pk', 'true', 'include-transaction', 'false', 'include-timestamp', 'true',
    'include-type-oids', 'true', 'format-version', '2',
    'actions', %(actions)s, 'add-tables', %(add_tables)s)
"""


def _columns(values: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {c["name"]: c["value"] for c in values or []}


def test_change_stream_carries_every_visible_state_of_a_job_in_order(logical_pg: str, tmp_path: Path) -> None:
    slot = f"ourvidz_test_{uuid.uuid4().hex[:8]}"
    with db.connect(logical_pg) as conn:
        publication = conn.execute(PUBLICATION).fetchone()
        assert publication is not None
        assert "public.jobs" in publication["add_tables"].split(","), "jobs is not in supabase_realtime"
        assert {"insert", "update", "delete"} <= set(publication["actions"].split(","))
        replident = conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'public.jobs'::regclass").fetchone()
        assert replident == {"relreplident": "f"}

        # Ground truth, kept apart from the stream: every row version, in commit order (a row's
        # updates serialize on its lock, so trigger order is commit order).
        conn.execute("CREATE TABLE IF NOT EXISTS public.test_job_versions (seq bigserial PRIMARY KEY, op text,"
                     " id uuid, status text, progress int, stage text)")
        conn.execute("TRUNCATE public.test_job_versions")
        conn.execute("""
            CREATE OR REPLACE FUNCTION public.test_record_version() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              INSERT INTO public.test_job_versions (op, id, status, progress, stage)
              VALUES (left(tg_op, 1), new.id, new.status, new.progress, new.stage);
              RETURN NULL;
            END $$""")
        conn.execute("CREATE OR REPLACE TRIGGER zz_test_record_version AFTER INSERT OR UPDATE ON public.jobs"
                     " FOR EACH ROW EXECUTE FUNCTION public.test_record_version()")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        try:
            user_id = conn.execute("INSERT INTO auth.users (email) VALUES (%s) RETURNING id",
                                   (f"{slot}@example.com",)).fetchone()["id"]
            job_id = conn.execute(
                "INSERT INTO public.jobs (job_type, payload, user_id) VALUES ('simulate', %s, %s) RETURNING id",
                (Jsonb({"prompt": "stream me", "config": {"steps": 12, "step_seconds": 0.05}}), user_id),
            ).fetchone()["id"]

            settings = Settings(database_url=logical_pg, home=tmp_path / "home", lease_seconds=3.0,
                                poll_interval=30.0, fallback_poll_interval=0.2, progress_interval=0.1,
                                worker_id=f"stream-{slot}")
            worker = Worker(settings, builtin_handlers(), LocalStorage(settings.storage_dir),
                            database_url=logical_pg)
            thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
            thread.start()
            try:
                final = wait_for(lambda: _terminal(conn, job_id), timeout=30)
            finally:
                worker.stop()
                thread.join(30)
            assert final["status"] == "completed"

            publication = conn.execute(PUBLICATION).fetchone()
            assert publication is not None
            changes = [json.loads(r["data"]) for r in
                       conn.execute(GET_CHANGES, {"slot": slot, **publication}).fetchall()]
            versions = conn.execute("SELECT op, status, progress, stage FROM public.test_job_versions"
                                    " WHERE id = %s ORDER BY seq", (job_id,)).fetchall()
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("DROP TRIGGER zz_test_record_version ON public.jobs")

    # Only what the publication names: not the workers table, not realtime.messages, not the ground truth.
    assert {(c["schema"], c["table"]) for c in changes} == {("public", "jobs")}
    stream = [(c["action"], _columns(c.get("columns"))) for c in changes]
    stream = [(action, row) for action, row in stream if row.get("id") == str(job_id)]
    assert [(a, r["status"], r["progress"], r["stage"]) for a, r in stream] == \
        [(v["op"], v["status"], v["progress"], v["stage"]) for v in versions]

    # The states a frontend cares about, in order: insert, claim, throttled progress, the end.
    states: list[tuple[str, str, int]] = []
    for action, row in stream:
        if not states or states[-1][1:] != (row["status"], row["progress"]):
            states.append((action, row["status"], row["progress"]))
    assert states[0] == ("I", "queued", 0)
    assert states[1][:2] == ("U", "processing")
    assert states[-1] == ("U", "completed", 100)
    steps = [progress for _, status, progress in states[1:-1] if status == "processing"]
    assert steps == sorted(steps)
    assert len({p for p in steps if 0 < p < 100}) >= 3, f"too few progress steps streamed: {steps}"
    # wal2json sends jsonb as text; Realtime casts it back (realtime.cast) before sending.
    assert json.loads(stream[-1][1]["result"])["assets"], "the completed row carries its result"
    # Replica identity FULL: an update carries the old row, so the claim shows where it came from.
    claim = next(c for c in changes if c["action"] == "U" and _columns(c["columns"]).get("status") == "processing")
    assert _columns(claim["identity"])["status"] == "queued"
    timestamps = [c["timestamp"] for c in changes]
    assert timestamps == sorted(timestamps)


def _terminal(conn: db.Connection, job_id: UUID) -> dict[str, Any] | None:
    row = conn.execute("SELECT status FROM public.jobs WHERE id = %s", (job_id,)).fetchone()
    return row if row and row["status"] in ("completed", "failed", "canceled") else None


# --- the broadcast topic and who may join it ---------------------------------------------


def _topic_messages(sql: psycopg.Connection[dict[str, Any]], topic: str, event: str = "job") -> list[dict[str, Any]]:
    return sql.execute("SELECT * FROM realtime.messages WHERE topic = %s AND event = %s"
                       " ORDER BY inserted_at, payload->>'updated_at'", (topic, event)).fetchall()


def _user(sql: psycopg.Connection[dict[str, Any]]) -> UUID:
    row = sql.execute("INSERT INTO auth.users (email) VALUES (%s) RETURNING id",
                      (f"{uuid.uuid4().hex[:10]}@example.com",)).fetchone()
    assert row is not None
    return UUID(str(row["id"]))


def _as_user(sql: psycopg.Connection[dict[str, Any]], user_id: UUID | None, query: str,
             params: tuple[Any, ...] = (), topic: str | None = None, commit: bool = False) -> list[dict[str, Any]]:
    """One PostgREST/Realtime request: role and JWT claims local to a transaction."""
    with sql.transaction(force_rollback=not commit):
        role = "authenticated" if user_id else "anon"
        sql.execute(f"SET LOCAL ROLE {role}")
        claims = {"sub": str(user_id), "role": role} if user_id else {"role": role}
        sql.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        if topic is not None:
            sql.execute("SELECT set_config('realtime.topic', %s, true)", (topic,))
        return sql.execute(query, params or None).fetchall()


def _messages(sql: psycopg.Connection[dict[str, Any]], job_id: Any) -> list[dict[str, Any]]:
    """The `job` events of a job's topic (`job_live` ones carry previews and estimates)."""
    return _topic_messages(sql, f"job:{job_id}")


def test_each_change_of_an_owned_job_is_broadcast_to_its_private_topic(
    sql: psycopg.Connection[dict[str, Any]], queue: JobQueue, start_worker: Callable[..., Any],
) -> None:
    owner, other = _user(sql), _user(sql)
    sql.execute("update public.job_types set users_may_submit = true where name = 'simulate'")  # opened to users
    # Inserted as a frontend does, through the owner's own session.
    inserted = _as_user(sql, owner, "INSERT INTO public.jobs (job_type, payload) VALUES ('simulate', %s) RETURNING id",
                        (Jsonb({"prompt": "watch me", "config": {"steps": 4, "step_seconds": 0.05}}),), commit=True)
    job_id = UUID(str(inserted[0]["id"]))
    service_id = queue.enqueue("simulate", {"prompt": "nobody watches", "config": {"steps": 4, "step_seconds": 0.05}})

    worker = start_worker()
    final = wait_status(queue, job_id, "completed", timeout=30)
    wait_status(queue, service_id, "completed", timeout=30)
    worker.stop()

    messages = _messages(sql, job_id)
    assert messages, "no broadcast for the owner's job"
    assert all(m["event"] == "job" and m["private"] is True and m["extension"] == "broadcast" for m in messages)
    payloads = [m["payload"] for m in messages]
    assert all(set(p) == BROADCAST_KEYS and p["id"] == str(job_id) for p in payloads)
    assert payloads[0]["status"] == "processing" and payloads[0]["attempts"] == 1  # the claim
    progress = [p["progress"] for p in payloads if p["status"] == "processing"]
    assert progress == sorted(progress) and len(set(progress)) >= 3
    assert payloads[-1]["status"] == "completed" and payloads[-1]["progress"] == 100
    assert payloads[-1]["result"] == json.loads(json.dumps(final["result"]))
    assert payloads[-1]["updated_at"] == sql.execute(
        "SELECT to_jsonb(updated_at) AS t FROM public.jobs WHERE id = %s", (job_id,)).fetchone()["t"]
    # Only visible changes: a lease heartbeat alone sends nothing.
    seen = [(p["status"], p["progress"], p["stage"], json.dumps(p["result"]), json.dumps(p["error"]))
            for p in payloads]
    assert all(a != b for a, b in pairwise(seen))

    assert _messages(sql, service_id) == [], "a job without an owner must not be broadcast"

    topic = f"job:{job_id}"
    read = "SELECT count(*) AS n FROM realtime.messages WHERE topic = %s"
    everything = sql.execute(read, (topic,)).fetchone()  # job_live events too
    assert _as_user(sql, owner, read, (topic,), topic=topic) == [everything] and everything["n"] >= len(messages)
    assert _as_user(sql, other, read, (topic,), topic=topic) == [{"n": 0}]
    assert _as_user(sql, None, read, (topic,), topic=topic) == [{"n": 0}]
    # Joined to another topic, the owner does not see this one's messages either.
    assert _as_user(sql, owner, read, (topic,), topic=f"job:{service_id}") == [{"n": 0}]
    # Topics that are not job ids are refused, not an error.
    for foreign in ("room:lobby", "job:not-a-uuid", "job:", ""):
        assert _as_user(sql, owner, "SELECT count(*) AS n FROM realtime.messages", topic=foreign) == [{"n": 0}]

    # A cancel by the owner (their own UPDATE under RLS) turns a queued job canceled: broadcast too.
    queued = _as_user(sql, owner, "INSERT INTO public.jobs (job_type, payload) VALUES ('simulate', '{}') RETURNING id",
                      commit=True)
    queued_id = queued[0]["id"]
    with sql.transaction():
        sql.execute("SET LOCAL ROLE authenticated")
        sql.execute("SELECT set_config('request.jwt.claims', %s, true)",
                    (json.dumps({"sub": str(owner), "role": "authenticated"}),))
        sql.execute("UPDATE public.jobs SET cancel_requested = true WHERE id = %s", (queued_id,))
    assert [m["payload"]["status"] for m in _messages(sql, queued_id)] == ["canceled"]


def test_a_users_jobs_are_broadcast_to_one_private_topic(
    sql: psycopg.Connection[dict[str, Any]], queue: JobQueue, start_worker: Callable[..., Any],
) -> None:
    owner, other = _user(sql), _user(sql)
    sql.execute("insert into public.job_types (name, queue, handler) values ('user_sim', 'demo', 'simulate')")
    insert = "INSERT INTO public.jobs (job_type, payload) VALUES ('user_sim', %s) RETURNING id"
    jobs = [UUID(str(_as_user(sql, owner, insert, (Jsonb({"config": {"steps": 3, "step_seconds": 0.05}}),),
                              commit=True)[0]["id"])) for _ in range(2)]
    queue.enqueue("user_sim", {"config": {"steps": 2, "step_seconds": 0}})  # a service job: no topic at all
    worker = start_worker()
    for job_id in jobs:
        wait_status(queue, job_id, "completed", timeout=30)
    worker.stop()

    topic = f"jobs:{owner}"
    messages = _topic_messages(sql, topic)
    assert all(m["event"] == "job" and m["private"] is True and set(m["payload"]) == BROADCAST_KEYS
               for m in messages)
    for job_id in jobs:  # both jobs on the one topic, each from its insert to its end
        mine = [m["payload"] for m in messages if m["payload"]["id"] == str(job_id)]
        assert mine[0]["status"] == "queued" and mine[0]["job_type"] == "user_sim" and mine[0]["created_at"]
        assert mine[-1]["status"] == "completed" and mine[-1]["progress"] == 100 and mine[-1]["finished_at"]
        # every update the job's own topic got, the list topic got too
        assert [m["payload"] for m in _messages(sql, job_id)] == mine[1:]
    assert {m["payload"]["id"] for m in messages} == {str(j) for j in jobs}

    read = "SELECT count(*) AS n FROM realtime.messages WHERE topic = %s"
    everything = sql.execute(read, (topic,)).fetchone()  # job_live events too
    assert _as_user(sql, owner, read, (topic,), topic=topic) == [everything] and everything["n"] >= len(messages)
    assert _as_user(sql, other, read, (topic,), topic=topic) == [{"n": 0}]  # another user may not join it
    assert _as_user(sql, None, read, (topic,), topic=topic) == [{"n": 0}]
    assert _as_user(sql, owner, read, (topic,), topic=f"jobs:{other}") == [{"n": 0}]
    for foreign in ("jobs:", f"jobs:{owner}x", "jobs:not-a-uuid"):
        assert _as_user(sql, owner, "SELECT count(*) AS n FROM realtime.messages", topic=foreign) == [{"n": 0}]


def test_realtime_migration_shape(sql: psycopg.Connection[dict[str, Any]]) -> None:
    published = sql.execute("SELECT count(*) AS n FROM pg_publication_tables WHERE pubname = 'supabase_realtime'"
                            " AND schemaname = 'public' AND tablename = 'jobs'").fetchone()
    assert published == {"n": 1}
    # The publication step is guarded: run again (a project that already published jobs), it is a no-op.
    first = db.split_statements(MIGRATION.read_text())[0]
    assert "alter publication" in first
    sql.execute(first.encode())
    assert sql.execute("SELECT count(*) AS n FROM pg_publication_tables WHERE pubname = 'supabase_realtime'"
                       " AND tablename = 'jobs'").fetchone() == {"n": 1}

    # The shim's realtime objects have Supabase's shapes.
    columns = sql.execute("SELECT column_name, data_type FROM information_schema.columns"
                          " WHERE table_schema = 'realtime' AND table_name = 'messages' ORDER BY ordinal_position")
    assert {r["column_name"]: r["data_type"] for r in columns.fetchall()} == {
        "topic": "text", "extension": "text", "payload": "jsonb", "event": "text", "private": "boolean",
        "updated_at": "timestamp without time zone", "inserted_at": "timestamp without time zone", "id": "uuid"}
    assert sql.execute("SELECT relrowsecurity FROM pg_class WHERE oid = 'realtime.messages'::regclass"
                       ).fetchone() == {"relrowsecurity": True}
    assert sql.execute("SELECT pg_get_function_arguments('realtime.send(jsonb, text, text, boolean)'::regprocedure)"
                       " AS args").fetchone() == {"args": "payload jsonb, event text, topic text, private boolean "
                                                          "DEFAULT true"}
    with sql.transaction(force_rollback=True):
        sql.execute("SELECT realtime.send('{\"hello\": 1}', 'greeting', 'room:1', false)")
        assert sql.execute("SELECT realtime.topic() AS t").fetchone() == {"t": "room:1"}
        sent = sql.execute("SELECT * FROM realtime.messages WHERE topic = 'room:1'").fetchone()
        assert sent is not None
        assert sent["payload"] == {"hello": 1, "id": str(sent["id"])}
        assert (sent["event"], sent["private"], sent["extension"]) == ("greeting", False, "broadcast")


# --- the Python watcher behind `jobs --watch` --------------------------------------------


def test_watch_uses_realtime_only_with_a_project_url_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPABASE_URL", "OURVIDZ_SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
                 "OURVIDZ_SUPABASE_SERVICE_ROLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert watch_backend(Settings(home=tmp_path)) == "database"
    assert watch_backend(Settings(home=tmp_path, supabase_url="https://x.supabase.co")) == "database"
    assert watch_backend(Settings(home=tmp_path, supabase_url="https://x.supabase.co",
                                  supabase_service_role_key="key")) == "supabase"


def test_watch_merges_sources_newest_first_and_stops_at_the_end() -> None:
    async def scenario() -> tuple[list[tuple[str, int, str]], JobWatch]:
        seen: list[tuple[str, int, str]] = []
        job_id = uuid.uuid4()
        watch = JobWatch(job_id, lambda row, source: seen.append((row["status"], row["progress"], source)))
        base = {"id": str(job_id), "job_type": "simulate"}
        watch.offer({**base, "status": "processing", "progress": 40, "updated_at": "2026-01-01T00:00:02.5+00:00"},
                    "broadcast")
        # The re-read answers after a newer broadcast: older, but it fills in columns broadcasts lack.
        watch.offer({**base, "status": "processing", "progress": 20, "payload": {"prompt": "p"},
                     "updated_at": "2026-01-01T00:00:02.25+00:00"}, "read")
        watch.offer({"id": str(uuid.uuid4()), "status": "failed", "updated_at": "2026-01-01T00:00:09+00:00"},
                    "broadcast")  # another job
        watch.offer({**base, "status": "processing", "progress": 40, "updated_at": "2026-01-01T00:00:02.500000+00:00"},
                    "postgres_changes")  # the same version again, from the other source
        watch.offer({**base, "status": "completed", "progress": 100, "updated_at": "2026-01-01T00:00:03+00:00"},
                    "postgres_changes")
        watch.offer({**base, "status": "processing", "progress": 60, "updated_at": "2026-01-01T00:00:04+00:00"},
                    "broadcast")  # nothing moves a terminal job
        return seen, watch

    seen, watch = asyncio.run(scenario())
    assert seen == [("processing", 40, "broadcast"), ("completed", 100, "postgres_changes")]
    assert watch.done.is_set()
    assert watch.row is not None and watch.row["payload"] == {"prompt": "p"} and watch.row["status"] == "completed"


def test_jobs_watch_follows_the_database_without_supabase_url(
    database_url: str, queue: JobQueue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from worker import cli

    job_id = queue.enqueue("no_such_type", {})  # fails at insert: already terminal
    for name in ("SUPABASE_URL", "OURVIDZ_SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
                 "OURVIDZ_SUPABASE_SERVICE_ROLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("OURVIDZ_HOME", str(tmp_path))

    async def must_not_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("Realtime used without SUPABASE_URL")

    monkeypatch.setattr("worker.watch.watch_supabase", must_not_run)
    result = CliRunner().invoke(cli.app, ["jobs", "--watch", str(job_id)])
    assert result.exit_code == 1, result.output
    assert "UNKNOWN_JOB_TYPE" in result.output

    # With a project URL and key, the same command goes through Realtime (stubbed: no project here).
    calls: list[UUID] = []

    async def fake_watch(settings: Settings, watched: UUID, on_change: Any = None, **kwargs: Any) -> dict[str, Any]:
        calls.append(watched)
        return {"id": str(watched), "status": "completed", "result": {"assets": []}, "error": None}

    monkeypatch.setattr("worker.watch.watch_supabase", fake_watch)
    monkeypatch.setenv("SUPABASE_URL", "https://example.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "service-role-key")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # never touched
    result = CliRunner().invoke(cli.app, ["jobs", "--watch", str(job_id)])
    assert result.exit_code == 0, result.output
    assert calls == [job_id]


@pytest.mark.skipif(not (os.environ.get("SUPABASE_URL") and os.environ.get("SUPABASE_SERVICE_ROLE_KEY")
                         and os.environ.get("DATABASE_URL")),
                    reason="needs a real Supabase project: SUPABASE_URL, SUPABASE_SERVICE_ROLE_KEY and its "
                           "DATABASE_URL (migrated) are not all set")
def test_watch_through_a_real_supabase_project(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, progress_interval=0.2, worker_id=f"realtime-it-{uuid.uuid4().hex[:6]}")
    assert settings.database_url
    pool = db.make_pool(settings.database_url, 2, name="realtime-it")
    queue = JobQueue(pool)
    job_id = queue.enqueue("simulate", {"prompt": "realtime", "config": {"steps": 6, "step_seconds": 0.2}})
    worker = Worker(settings, builtin_handlers(), LocalStorage(settings.storage_dir), max_jobs=1)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    seen: list[str] = []
    try:
        thread.start()
        row = asyncio.run(watch_supabase(settings, job_id, lambda r, source: seen.append(source), timeout=120))
    finally:
        worker.stop()
        thread.join(30)
        pool.close()
    assert row["status"] == "completed"
    assert seen and seen[0] == "read"
