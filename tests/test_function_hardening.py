"""Supabase's Security Advisor rules, for every function in our schemas (pg_proc, so functions that
later migrations add are covered too): a fixed search_path, and no SECURITY DEFINER function an
API role may call unless it is meant to be. And the worker's own database role of
docs/security.md, created from the doc's SQL block and used by a real worker."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from tests.conftest import wait_status
from worker import db
from worker.config import REPO_ROOT
from worker.handlers.simulate import SimulateHandler
from worker.queue import JobQueue

SECURITY_DOC = REPO_ROOT / "docs" / "security.md"

OUR_SCHEMAS = ("public", "private")
API_ROLES = ("anon", "authenticated")
# Security definer functions an API role may call, and why (docs/security.md says the same).
CALLABLE_DEFINERS = {
    "public.job_limits(text)": {"authenticated"},  # the limits of a job type, from job_quotas users cannot read
    "private.is_job_topic_owner(text)": {"authenticated"},  # the realtime.messages policy for job:<id>
    "public.job_queue_position(uuid[])": {"authenticated"},  # a user's own queued jobs: place, estimated start
}

FUNCTIONS = """
select p.oid, format('%%s.%%s(%%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)) as name,
       p.prosecdef as definer, p.proconfig as config,
       array(select r from unnest(%(roles)s::text[]) as r where has_function_privilege(r, p.oid, 'EXECUTE'))
         as callers
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = any(%(schemas)s) and p.prokind in ('f', 'p')
  and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                  and d.deptype = 'e')
order by 2
"""


def _functions(sql: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sql.execute(FUNCTIONS, {"schemas": list(OUR_SCHEMAS), "roles": list(API_ROLES)}).fetchall()
    assert len(rows) >= 10, [r["name"] for r in rows]  # the migrations' own functions are all here
    return rows


def test_every_function_has_a_fixed_search_path(sql: psycopg.Connection[dict[str, Any]]) -> None:
    unfixed = [f["name"] for f in _functions(sql)
               if not any(setting.startswith("search_path=") for setting in f["config"] or [])]
    assert unfixed == [], f"functions without `set search_path` (the Advisor's function_search_path_mutable): {unfixed}"


def test_no_security_definer_function_is_callable_by_api_roles_unless_meant(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    definers = {f["name"]: set(f["callers"]) for f in _functions(sql) if f["definer"]}
    assert {"public.job_limits(text)", "private.is_job_topic_owner(text)"} <= set(definers)
    exposed = {name: callers - CALLABLE_DEFINERS.get(name, set()) for name, callers in definers.items()}
    assert {name: roles for name, roles in exposed.items() if roles} == {}
    assert definers["public.job_limits(text)"] == {"authenticated"}
    assert definers["public.jobs_broadcast()"] == set()


def test_a_user_topic_and_a_revoked_trigger_function_still_work(sql: psycopg.Connection[dict[str, Any]]) -> None:
    """Revoking EXECUTE from the API roles does not stop their triggers: a user's insert still runs
    every trigger (queue and attempts from the job type, the broadcast of the new job)."""
    user = sql.execute("insert into auth.users (email) values ('hardening@example.com') returning id").fetchone()
    assert user is not None
    sql.execute("insert into public.job_types (name, queue, handler, max_attempts)"
                " values ('user_sim', 'demo', 'simulate', 2)")
    with sql.transaction(force_rollback=True):
        sql.execute("set local role authenticated")
        sql.execute("select set_config('request.jwt.claims', %s, true)",
                    (f'{{"sub": "{user["id"]}", "role": "authenticated"}}',))
        row = sql.execute("insert into public.jobs (job_type, payload) values ('user_sim', '{}')"
                          " returning id, queue, max_attempts, status").fetchone()
        assert row is not None and (row["queue"], row["max_attempts"], row["status"]) == ("demo", 2, "queued")
        sql.execute("reset role")
        sent = sql.execute("select topic, payload from realtime.messages where topic = %s",
                           (f"jobs:{user['id']}",)).fetchall()
    assert [m["payload"]["id"] for m in sent] == [str(row["id"])]


def worker_role_sql() -> str:
    """The first SQL block of the doc's section on the worker's role."""
    section = SECURITY_DOC.read_text().split("## The worker's database role", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sql\n(.*?)```", section, re.S)
    assert match, "docs/security.md: no SQL block for the worker's role"
    return match.group(1)


def test_a_worker_runs_as_the_documented_login_role(
    sql: psycopg.Connection[dict[str, Any]], database_url: str, start_worker: Callable[..., Any],
) -> None:
    role, granted_only = f"ourvidz_worker_{uuid.uuid4().hex[:8]}", f"ourvidz_granted_{uuid.uuid4().hex[:8]}"
    script = worker_role_sql().replace("ourvidz_worker", role)
    assert "bypassrls" in script and "service_role" not in script
    url = make_conninfo(database_url, user=role, password="a long random password")
    try:
        for statement in db.split_statements(script):
            sql.execute(statement.encode())
        # What the old docs implied, a login role granted service_role: its table privileges come
        # with it, its BYPASSRLS does not, so row level security hides every job.
        sql.execute(f"create role {granted_only} login")
        sql.execute(f"grant service_role to {granted_only}")
        user = sql.execute("insert into auth.users (email) values ('role@example.com') returning id").fetchone()
        assert user is not None
        owned = sql.execute("insert into public.jobs (job_type, payload, user_id) values ('simulate', %s, %s)"
                            " returning id", ('{"config": {"steps": 2, "step_seconds": 0}}', user["id"])).fetchone()
        assert owned is not None
        with db.connect(make_conninfo(database_url, user=granted_only)) as conn:
            assert conn.execute("select count(*) as n from public.jobs").fetchone() == {"n": 0}

        pool = db.make_pool(url, 1, name="role-test")
        try:
            queue = JobQueue(pool)
            service_job = queue.enqueue("simulate", {"config": {"steps": 2, "step_seconds": 0}})
            worker = start_worker({"simulate": SimulateHandler()}, database_url=url)
            for job_id in (owned["id"], service_job):
                assert wait_status(queue, job_id, "completed", "failed")["status"] == "completed"
            worker.stop()
            with pool.connection() as conn:
                assert conn.execute("select count(*) as n from public.queue_depth").fetchone()["n"] >= 1
        finally:
            pool.close()
        assert sql.execute("select state from public.workers where id = %s",
                           (worker.worker.id,)).fetchone() == {"state": "stopped"}
    finally:
        for name in (role, granted_only):
            if sql.execute("select 1 from pg_roles where rolname = %s", (name,)).fetchone():
                sql.execute(f"drop owned by {name}")
                sql.execute(f"drop role {name}")
