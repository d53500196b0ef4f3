"""Supabase's Security Advisor rules, for every function in our schemas (pg_proc, so functions that
later migrations add are covered too): a fixed search_path, and no SECURITY DEFINER function an
API role may call unless it is meant to be."""

from __future__ import annotations

from typing import Any

import psycopg

OUR_SCHEMAS = ("public", "private")
API_ROLES = ("anon", "authenticated")
# Security definer functions an API role may call, and why (docs/security.md says the same).
CALLABLE_DEFINERS = {
    "public.job_limits(text)": {"authenticated"},  # the limits of a job type, from job_quotas users cannot read
    "private.is_job_topic_owner(text)": {"authenticated"},  # the realtime.messages policy for job:<id>
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
    assert set(CALLABLE_DEFINERS) <= set(definers), "an allowed definer is gone: update the list and the docs"
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
