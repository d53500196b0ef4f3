"""Mistakes get a sentence (issue 11, items 2, 3 and 8): the real CLI in a real process, against the
test's database. A person's mistake is one line on stderr and exit 2 (the command line or a
setting) or 1 (it could not be done), never a traceback and never a password."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import PostgresServer
from worker.queue import JobQueue

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pw"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Exploding:
    """A handler whose constructor fails: an error nobody planned for."""

    def __init__(self) -> None:
        raise RuntimeError("the handler's own bug")


def cli(tmp_path: Path, *args: str, url: str | None, timeout: float = 30,
        **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("OURVIDZ_", "SUPABASE_")) and k not in ("DATABASE_URL", "COLUMNS")}
    base.update(OURVIDZ_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO_ROOT), **env)
    if url is not None:
        base["DATABASE_URL"] = url
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=base, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_sentence(done: subprocess.CompletedProcess[str], code: int, *says: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == code, f"rc {done.returncode}, wanted {code}:\n{output}"
    assert "Traceback" not in output and SECRET not in output, output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one sentence:\n{done.stderr}"
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["enqueue", "simulate", "--priority", "500"], "'--priority'"),
    (["enqueue", "simulate", "--payload", "{bad"], "not valid JSON"),
    (["enqueue", "simulate", "--payload", "[1]"], "must be a JSON object"),
    (["enqueue", "simulate", "--user", "not-a-uuid"], "'not-a-uuid' is not a UUID"),
    (["run", "--concurrency", "0"], "'--concurrency'"),
    (["jobs", "--watch", "12345"], "is not a UUID"),
    (["types", "add", "brand_new", "--handler", "x"], "a new one needs a queue and a handler"),
])
def test_usage_errors_are_one_sentence(tmp_path, database_url, args, says):
    one_sentence(cli(tmp_path, *args, url=database_url), 2, says, "--help")


def test_bad_settings_and_log_format_are_one_sentence(tmp_path, database_url):
    line = one_sentence(cli(tmp_path, "jobs", url=database_url, OURVIDZ_POLL_INTERVAL="soon"), 2)
    assert "poll_interval (OURVIDZ_POLL_INTERVAL)" in line and "soon" not in line, "names the setting, not its value"
    one_sentence(cli(tmp_path, "jobs", url=database_url, OURVIDZ_LOG_FORMAT="xml"), 2, "OURVIDZ_LOG_FORMAT")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_wrong_database_url_says_why_without_the_password(tmp_path, pg_server: PostgresServer):
    role = make_conninfo(pg_server.url, user="nosuchuser", password=SECRET)
    for command in (["jobs"], ["types"], ["migrate"], ["enqueue", "simulate"]):
        one_sentence(cli(tmp_path, *command, url=role, timeout=20), 1, 'role "nosuchuser" does not exist')
    refused = f"postgresql://app:{SECRET}@127.0.0.1:{_closed_port()}/app"
    one_sentence(cli(tmp_path, "run", url=refused, timeout=20), 1, "Connection refused")
    unknown = f"postgresql://app:{SECRET}@no-such-host.invalid/app"
    one_sentence(cli(tmp_path, "jobs", url=unknown, timeout=20), 1, "no-such-host.invalid")
    for malformed in (f"postgresql://app:{SECRET}@[db/app", f"app:{SECRET}@db:5432", f"postgresql://app:{SECRET}%zz@db/app"):
        one_sentence(cli(tmp_path, "jobs", url=malformed), 2, "DATABASE_URL is not a valid Postgres URL")


def test_the_database_refusing_is_one_sentence(tmp_path, database_url):
    one_sentence(cli(tmp_path, "enqueue", "simulate", "--user", str(uuid.uuid4()), url=database_url), 1,
                 "the database refused it", "foreign key")


def test_an_unexpected_error_is_one_line_unless_verbose(tmp_path, database_url):
    spec = "boom=tests.test_cli_errors:Exploding"
    one_sentence(cli(tmp_path, "run", "--handler", spec, url=database_url), 1,
                 "unexpected RuntimeError: the handler's own bug", "run with --verbose for the traceback")
    verbose = cli(tmp_path, "run", "--handler", spec, "--verbose", url=database_url)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "raise RuntimeError" in verbose.stderr, verbose.stderr


def _listed(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_jobs_lists_whole_ids_piped_narrow_and_as_json(tmp_path, database_url, queue: JobQueue):
    long_type = "a_job_type_with_a_name_long_enough_to_push_a_row_past_eighty_columns"
    queue.upsert_job_type(long_type, "nowhere", "nothing")
    ids = [str(queue.enqueue(long_type, {})), str(queue.enqueue("simulate", {}))]

    piped = _listed(cli(tmp_path, "jobs", url=database_url, COLUMNS="80"))
    rows = {line.split()[0]: line for line in piped.splitlines()[1:]}
    assert set(ids) <= set(rows), piped
    assert long_type in rows[ids[0]] and len(rows[ids[0]]) > 80, "piped output is never cut to a width"

    narrow = _listed(cli(tmp_path, "jobs", url=database_url, COLUMNS="80", TTY_COMPATIBLE="1"))
    text = ANSI.sub("", narrow)
    assert all(job_id in text for job_id in ids), f"an 80-column terminal still shows whole ids:\n{text}"

    listed = json.loads(_listed(cli(tmp_path, "jobs", "--json", url=database_url)))
    by_id: dict[str, Any] = {row["id"]: row for row in listed}
    assert set(ids) <= set(by_id)
    assert by_id[ids[0]]["job_type"] == long_type and by_id[ids[0]]["status"] == "queued"
    assert by_id[ids[0]]["created_at"].count("T") == 1, "times are ISO 8601"

    types = json.loads(_listed(cli(tmp_path, "types", "--json", url=database_url)))
    assert {"simulate", long_type} <= {row["name"] for row in types}


def test_types_add_changes_only_what_it_is_given(tmp_path, database_url, queue: JobQueue, sql):
    created = cli(tmp_path, "types", "add", "upscale", "--handler", "upscaler", "--queue", "images",
                  "--defaults", '{"steps": 20, "scale": 2}', "--max-attempts", "5", "--bucket", "upscaled",
                  url=database_url)
    assert "job type upscale created" in _listed(created)
    updated = cli(tmp_path, "types", "add", "upscale", "--queue", "gpu2", url=database_url)
    assert "job type upscale updated" in _listed(updated)
    [row] = sql.execute("select * from job_types where name = 'upscale'").fetchall()
    assert row["queue"] == "gpu2"
    assert (row["handler"], row["defaults"], row["max_attempts"], row["bucket"], row["enabled"]) == \
        ("upscaler", {"steps": 20, "scale": 2}, 5, "upscaled", True)

    # a preset from the migrations keeps its defaults when only its attempts change
    before = sql.execute("select * from job_types where name = 'sdxl_image_fast'").fetchone()
    _listed(cli(tmp_path, "types", "add", "sdxl_image_fast", "--max-attempts", "4", "--disable", url=database_url))
    after = sql.execute("select * from job_types where name = 'sdxl_image_fast'").fetchone()
    assert after["max_attempts"] == 4 and after["enabled"] is False
    unchanged = {k for k in before if k not in ("max_attempts", "enabled", "updated_at")}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
