"""The frontend contract in realtime/src/jobs.ts cannot drift from the worker and the schema: it
type-checks, its error codes are worker.jobs.ErrorCode, its row type is the migrated `jobs` table
(name, nullability and kind of every column), its status type is the enum, and its broadcast
types carry what the triggers send."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.test_realtime import BROADCAST_KEYS
from worker.config import REPO_ROOT
from worker.jobs import ErrorCode

REALTIME_DIR = REPO_ROOT / "realtime"
JOBS_TS = REALTIME_DIR / "src" / "jobs.ts"

# How each Postgres type of a `jobs` column reads in TypeScript.
KINDS = {"uuid": "string", "text": "string", "timestamp with time zone": "string", "integer": "number",
         "smallint": "number", "bigint": "number", "boolean": "boolean", "jsonb": "json",
         "job_status": "JobStatus"}
PRIMITIVES = {"string", "number", "boolean", "JobStatus"}


def ts_source() -> str:
    return JOBS_TS.read_text()


def ts_union(name: str) -> list[str]:
    match = re.search(rf"export type {name} =((?:\s*\|?\s*'[^']*')+)", ts_source())
    assert match, f"jobs.ts: no union type {name}"
    return re.findall(r"'([^']*)'", match.group(1))


def ts_pick(name: str) -> set[str]:
    match = re.search(rf"export type {name} = Pick<\s*JobRow,(.*?)>", ts_source(), re.S)
    assert match, f"jobs.ts: no Pick<JobRow, ...> type {name}"
    return set(re.findall(r"'([^']*)'", match.group(1)))


def ts_interface(name: str) -> dict[str, str]:
    """Field -> type of an interface's own lines (two-space indent), comments left out."""
    match = re.search(rf"export interface {name} \{{\n(.*?)\n\}}", ts_source(), re.S)
    assert match, f"jobs.ts: no interface {name}"
    fields = {}
    for line in match.group(1).splitlines():
        field = re.fullmatch(r"  (\w+)(\??): (.+)", line)
        if field:
            fields[field.group(1)] = field.group(3) + (" | undefined" if field.group(2) else "")
    return fields


def ts_kind(type_text: str) -> tuple[str, bool]:
    parts = [p.strip() for p in type_text.split("|")]
    nullable = "null" in parts
    rest = [p for p in parts if p not in ("null", "undefined")]
    assert len(rest) == 1, f"one type besides null: {type_text}"
    return (rest[0] if rest[0] in PRIMITIVES else "json"), nullable


def test_typescript_helper_type_checks() -> None:
    if not shutil.which("npm") or not shutil.which("node"):
        pytest.skip("node/npm not installed: the TypeScript helper needs them")
    if not (REALTIME_DIR / "node_modules" / ".bin" / "tsc").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=REALTIME_DIR, check=True,
                       capture_output=True, timeout=600)
    # npx from realtime/, so that it runs the locked TypeScript in realtime/node_modules.
    result = subprocess.run(["npx", "--no-install", "tsc", "--noEmit", "-p", "."], cwd=REALTIME_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_error_codes_are_the_workers() -> None:
    codes = ts_union("JobErrorCode")
    assert len(codes) == len(set(codes))
    assert set(codes) == {code.value for code in ErrorCode}


def test_job_row_type_is_the_jobs_table(sql: psycopg.Connection[dict[str, Any]]) -> None:
    columns = sql.execute("select column_name, data_type, udt_name, is_nullable from information_schema.columns"
                          " where table_schema = 'public' and table_name = 'jobs'").fetchall()
    row = ts_interface("JobRow")
    assert set(row) == {c["column_name"] for c in columns}, "JobRow's fields are the columns of public.jobs"
    for column in columns:
        kind, nullable = ts_kind(row[column["column_name"]])
        pg_type = column["udt_name"] if column["data_type"] == "USER-DEFINED" else column["data_type"]
        assert kind == KINDS[pg_type], f"{column['column_name']}: {pg_type} is {KINDS[pg_type]} in TypeScript"
        assert nullable == (column["is_nullable"] == "YES"), f"{column['column_name']}: nullability"
    labels = sql.execute("select enumlabel from pg_enum where enumtypid = 'public.job_status'::regtype"
                         " order by enumsortorder").fetchall()
    assert ts_union("JobStatus") == [r["enumlabel"] for r in labels]


def test_broadcast_types_carry_what_the_triggers_send(sql: psycopg.Connection[dict[str, Any]]) -> None:
    assert ts_pick("JobUpdate") == BROADCAST_KEYS  # tests/test_realtime.py checks real messages against these
    # A running job's preview moves: the `job_live` event on its topics.
    user = sql.execute("insert into auth.users (email) values (%s) returning id",
                       (f"{uuid.uuid4().hex[:8]}@example.com",)).fetchone()
    assert user is not None
    job = sql.execute("insert into public.jobs (job_type, payload, user_id) values ('simulate', '{}', %s)"
                      " returning id", (user["id"],)).fetchone()
    assert job is not None
    sql.execute("update public.jobs set status = 'processing', worker_id = 'w', lease_expires_at = now() + '1 min',"
                " attempts = 1 where id = %s", (job["id"],))
    sql.execute("update public.jobs set preview = %s where id = %s",
                (json.dumps({"bucket": "b", "path": "p", "url": "u", "content_type": "image/webp"}), job["id"]))
    live = sql.execute("select topic, payload from realtime.messages where event = 'job_live'"
                       " and payload->>'id' = %s", (str(job["id"]),)).fetchall()
    assert {m["topic"] for m in live} == {f"job:{job['id']}", f"jobs:{user['id']}"}
    assert all(set(m["payload"]) == ts_pick("JobLiveUpdate") for m in live)
    preview = ts_interface("JobPreview")
    assert {"bucket", "path", "url", "content_type"} <= {k for k, v in preview.items() if "undefined" not in v}


def test_the_helper_joins_the_topics_the_policies_allow() -> None:
    source = ts_source()
    assert "`job:${id}`" in source and "`jobs:${userId}`" in source
    migrations = "".join(p.read_text() for p in sorted((REPO_ROOT / "sql" / "migrations").glob("*.sql")))
    assert "'job:' || new.id" in migrations and "'jobs:' || new.user_id" in migrations
    assert Path(REALTIME_DIR / "examples" / "job_list.ts").exists(), "the one-channel list has an example"
