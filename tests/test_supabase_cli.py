"""sql/migrations apply unchanged with the real Supabase CLI (npm package `supabase`).

After the bootstrap shim (what a Supabase project already has), `supabase migration up --remote
<url>` runs against a fresh database on the test server; then both tools must agree: the CLI's
history lists every migration with the statements our runner would record, our runner finds
nothing left to apply, and the schema equals the one our runner builds on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import PostgresServer
from worker import db
from worker.config import REPO_ROOT, Settings

REALTIME_DIR = REPO_ROOT / "realtime"
SCHEMAS = ("public", "private", "auth", "storage", "realtime")


def _cli() -> Path:
    """The CLI from realtime/node_modules (installed from the lock file if missing); skip without npm."""
    if not shutil.which("npm") or not shutil.which("npx") or not shutil.which("node"):
        pytest.skip("node/npx not installed: the Supabase CLI ships as the npm package `supabase`")
    cli = REALTIME_DIR / "node_modules" / ".bin" / "supabase"
    if not cli.exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=REALTIME_DIR, check=True,
                       capture_output=True, timeout=600)
    return cli


def cli_url(conninfo: str) -> str:
    """A URL the CLI accepts. For a unix socket it needs a host placeholder and the port, which
    name the socket file: postgresql://user@localhost:5432/db?host=/socket/dir."""
    params = conninfo_to_dict(conninfo)
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or 5432)
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = str(params.get("password") or "")
    auth = f"{user}:{quote(password, safe='')}" if password else user
    database = quote(str(params["dbname"]), safe="")
    if host.startswith("/"):
        return f"postgresql://{auth}@localhost:{port}/{database}?{urlencode({'host': host})}"
    return f"postgresql://{auth}@{host}:{port}/{database}?sslmode={params.get('sslmode') or 'disable'}"


@pytest.fixture
def fresh_databases(pg_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """Two empty databases (not the migrated template): one for the CLI, one for our runner."""
    names = [f"cli_{uuid.uuid4().hex[:10]}", f"ref_{uuid.uuid4().hex[:10]}"]
    with db.connect(pg_server.url) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.database_url(names[0]), pg_server.database_url(names[1])
    with db.connect(pg_server.url) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _schema(url: str) -> dict[str, Any]:
    """Everything the migrations define, as comparable text."""
    queries = {
        "columns": """
            SELECT table_schema, table_name, column_name, data_type, udt_name, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = ANY(%(schemas)s)""",
        "relations": """
            SELECT n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.relreplident,
                   c.relacl::text AS acl, obj_description(c.oid, 'pg_class') AS comment
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')""",
        "constraints": """
            SELECT n.nspname, c.conrelid::regclass::text AS rel, c.conname, pg_get_constraintdef(c.oid) AS def
            FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE n.nspname = ANY(%(schemas)s)""",
        "indexes": "SELECT schemaname, indexname, indexdef FROM pg_indexes WHERE schemaname = ANY(%(schemas)s)",
        "functions": """
            SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) AS args,
                   pg_get_functiondef(p.oid) AS def, p.proacl::text AS acl
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = ANY(%(schemas)s) AND p.prokind IN ('f', 'p')""",
        "triggers": """
            SELECT n.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid) AS def
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE NOT t.tgisinternal AND n.nspname = ANY(%(schemas)s)""",
        "policies": """
            SELECT schemaname, tablename, policyname, permissive, roles::text, cmd, qual, with_check
            FROM pg_policies WHERE schemaname = ANY(%(schemas)s)""",
        "types": """
            SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) AS labels
            FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = ANY(%(schemas)s) GROUP BY t.typname""",
        "schemas": "SELECT nspname, nspacl::text AS acl FROM pg_namespace WHERE nspname = ANY(%(schemas)s)",
        "publication": "SELECT pubname, schemaname, tablename FROM pg_publication_tables",
        "seeded job types": """
            SELECT name, queue, handler, model, content_type, file_extension, bucket, defaults::text,
                   expected_seconds, max_attempts, enabled, description FROM public.job_types""",
    }
    snapshot: dict[str, Any] = {}
    with db.connect(url) as conn:
        for name, query in queries.items():
            rows = conn.execute(query, {"schemas": list(SCHEMAS)}).fetchall()
            snapshot[name] = sorted(repr(sorted(row.items())) for row in rows)
    return snapshot


def test_migrations_apply_unchanged_with_the_supabase_cli(
    fresh_databases: tuple[str, str], tmp_path: Path,
) -> None:
    cli = _cli()
    cli_db, reference_db = fresh_databases
    # Both tools read one copy of the files, taken once.
    workdir = tmp_path / "project"
    folder = workdir / "supabase" / "migrations"
    folder.mkdir(parents=True)
    for path in sorted(Settings().migrations_dir.glob("*.sql")):
        shutil.copy(path, folder / path.name)
    bootstrap = shutil.copy(Settings().bootstrap_file, tmp_path / "supabase_shim.sql")

    class ProjectSettings(Settings):
        @property
        def migrations_dir(self) -> Path:
            return folder

        @property
        def bootstrap_file(self) -> Path:
            return Path(bootstrap)

    settings = ProjectSettings(home=tmp_path / "home")
    migrations = db.discover_migrations(settings.migrations_dir)

    # What a Supabase project has before any migration of ours (as worker.db.migrate does it).
    with db.connect(cli_db) as conn, conn.transaction():
        if not db.is_supabase(conn):
            for statement in db.split_statements(settings.bootstrap_file.read_text()):
                conn.execute(statement.encode())

    env = {**os.environ, "HOME": str(tmp_path / "cli-home"), "DO_NOT_TRACK": "1"}
    run = subprocess.run([str(cli), "migration", "up", "--yes", "--workdir", str(workdir),
                          f"--remote={cli_url(cli_db)}"], capture_output=True, text=True, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    for migration in migrations:
        assert f"Applying migration {migration.path.name}" in output, output

    with db.connect(cli_db) as conn:
        history = conn.execute("SELECT version, name, statements FROM supabase_migrations.schema_migrations"
                               " ORDER BY version").fetchall()
    assert [(h["version"], h["name"]) for h in history] == [(m.version, m.name) for m in migrations]
    # Our runner splits each file into the same statements the CLI records (it keeps the ';').
    for migration, recorded in zip(migrations, history, strict=True):
        assert [s.rstrip(";").rstrip() for s in migration.statements] == recorded["statements"], migration.name

    # Both tools agree on what is applied ...
    assert db.migrate(cli_db, settings) == []
    # ... and on what it built.
    assert [m.version for m in db.migrate(reference_db, settings)] == [m.version for m in migrations]
    cli_schema, reference_schema = _schema(cli_db), _schema(reference_db)
    assert cli_schema["publication"], "nothing is published to supabase_realtime"
    assert any("jobs_broadcast" in trigger for trigger in cli_schema["triggers"])
    for part in cli_schema:
        assert cli_schema[part] == reference_schema[part], part
