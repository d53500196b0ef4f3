"""Our migrations and the real Supabase CLI (npm package `supabase`) on one database.

- After the bootstrap shim (what a Supabase project already has), `supabase migration up --remote
  <url>` runs against a fresh database on the test server; then both tools must agree: the CLI's
  history lists every migration with the statements our runner would record, our runner finds
  nothing left to apply, and the schema equals the one our runner builds on its own.
- On a Supabase project that has migrations of its own, in either order, `ourvidz-worker migrate`
  and the team's `supabase db push` never break each other, and `ourvidz-worker supabase export`
  deploys ours through `db push` with theirs.
- Supabase is told per database, not per cluster.

A "Supabase project" here is a database with what the shim creates plus Supabase Auth's own
history table (`auth.schema_migrations`), which is what worker.db.is_supabase looks for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner

from tests.conftest import PostgresServer
from worker import db
from worker.cli import app
from worker.config import REPO_ROOT, Settings
from worker.supabase_cli import export_migrations

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


# --- a Supabase project with migrations of its own -----------------------------------------


@pytest.fixture
def new_database(pg_server: PostgresServer) -> Iterator[Callable[[], str]]:
    names: list[str] = []

    def make() -> str:
        name = f"sb_{uuid.uuid4().hex[:10]}"
        with db.connect(pg_server.url) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        names.append(name)
        return pg_server.database_url(name)

    yield make
    with db.connect(pg_server.url) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def supabase_project(url: str) -> str:
    with db.connect(url) as conn, conn.transaction():
        for statement in db.split_statements(Settings().bootstrap_file.read_text()):
            conn.execute(statement.encode())
        conn.execute("create table auth.schema_migrations (version varchar(255) primary key)")  # as Auth has it
    return url


@dataclass
class Project:
    """A team's project folder (supabase/migrations) and the CLI run on it."""

    workdir: Path
    cli: Path

    @property
    def folder(self) -> Path:
        return self.workdir / "supabase" / "migrations"

    def add(self, version: str, name: str, sql: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{version}_{name}.sql").write_text(sql)

    def run(self, *args: str) -> tuple[int, str]:
        env = {**os.environ, "HOME": str(self.workdir.parent / "cli-home"), "DO_NOT_TRACK": "1"}
        done = subprocess.run([str(self.cli), *args, "--yes", "--workdir", str(self.workdir)],
                              capture_output=True, text=True, env=env, timeout=120)
        return done.returncode, done.stdout + done.stderr

    def push(self, url: str, *flags: str) -> tuple[int, str]:
        return self.run("db", "push", *flags, f"--remote={cli_url(url)}")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "team", _cli())


def cli_history(url: str) -> list[str]:
    with db.connect(url) as conn:
        if conn.execute("select to_regclass('supabase_migrations.schema_migrations') is null as none").fetchone() \
                == {"none": True}:
            return []
        return [r["version"] for r in
                conn.execute("select version from supabase_migrations.schema_migrations order by version")]


def own_history(url: str) -> list[str]:
    with db.connect(url) as conn:
        return [r["version"] for r in conn.execute("select version from ourvidz.schema_migrations order by version")]


def tables(url: str, *names: str) -> list[str]:
    with db.connect(url) as conn:
        return [n for n in names if conn.execute("select to_regclass(%s) as t", (n,)).fetchone() != {"t": None}]


OURS = [m.version for m in db.discover_migrations(Settings().migrations_dir)]
THEIRS = ("20250101000000", "todos", "create table public.todos (id bigint primary key, title text not null);")
THEIR_NEXT = ("20261215000000", "todo_done", "alter table public.todos add column done boolean default false;")


def test_supabase_is_told_per_database(new_database: Callable[[], str], database_url: str,
                                       pg_server: PostgresServer) -> None:
    with db.connect(pg_server.url) as admin:
        created = admin.execute("select not exists (select 1 from pg_roles where rolname = 'supabase_admin') as c"
                                ).fetchone() == {"c": True}
        if created:  # a Supabase cluster's role, which every database of the cluster sees
            admin.execute("create role supabase_admin nologin")
    try:
        plain = new_database()  # a second database of that cluster: no auth, no storage
        with db.connect(plain) as conn:
            assert not db.is_supabase(conn)
        assert [m.version for m in db.migrate(plain)] == OURS, "the bootstrap runs where Supabase's schemas are not"
        assert tables(plain, "public.jobs", "auth.users") == ["public.jobs", "auth.users"]
        with db.connect(database_url) as conn:
            assert not db.is_supabase(conn), "a database our bootstrap built is not taken for a project"
        with db.connect(supabase_project(new_database())) as conn:
            assert db.is_supabase(conn)
    finally:
        if created:
            with db.connect(pg_server.url) as admin:
                admin.execute("drop role supabase_admin")


def test_migrate_first_then_their_db_push(new_database: Callable[[], str], project: Project) -> None:
    url = supabase_project(new_database())
    assert [m.version for m in db.migrate(url)] == OURS
    assert cli_history(url) == [] and own_history(url) == OURS  # the CLI's history is the team's alone

    project.add(*THEIRS)
    code, output = project.push(url)
    assert code == 0 and "Applying migration 20250101000000_todos.sql" in output, output
    assert db.migrate(url) == []
    project.add(*THEIR_NEXT)  # older than some of ours: nothing of ours is in the CLI's way
    code, output = project.push(url)
    assert code == 0 and "20261215000000_todo_done.sql" in output, output
    assert cli_history(url) == [THEIRS[0], THEIR_NEXT[0]] and own_history(url) == OURS


def test_their_db_push_first_then_migrate(new_database: Callable[[], str], project: Project) -> None:
    url = supabase_project(new_database())
    project.add(*THEIRS)
    code, output = project.push(url)
    assert code == 0, output
    assert [m.version for m in db.migrate(url)] == OURS  # versions we do not know in the CLI's history are theirs
    project.add(*THEIR_NEXT)
    code, output = project.push(url)
    assert code == 0 and "Applying migration 20261215000000_todo_done.sql" in output, output
    assert cli_history(url) == [THEIRS[0], THEIR_NEXT[0]] and own_history(url) == OURS
    assert tables(url, "public.todos", "public.jobs") == ["public.todos", "public.jobs"]


def export(folder: Path, *options: str) -> str:
    result = CliRunner().invoke(app, ["supabase", "export", "--dir", str(folder), *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_deploys_ours_with_theirs_and_migrate_steps_aside(
    new_database: Callable[[], str], project: Project, tmp_path: Path,
) -> None:
    url = supabase_project(new_database())
    project.add(*THEIRS)
    output = export(project.folder)
    assert f"wrote {len(OURS)} of {len(OURS)} ourvidz migrations" in output
    code, output = project.push(url)
    assert code == 0, output
    for version in [THEIRS[0], *OURS]:
        assert f"Applying migration {version}_" in output, output
    assert cli_history(url) == [THEIRS[0], *OURS]
    assert db.migrate(url) == []  # the CLI applied them: nothing left, nothing recorded twice

    # A newer release brings a migration: migrate leaves it to the CLI, export adds only it.
    newer = tmp_path / "newer"
    shutil.copytree(Settings().migrations_dir, newer)
    (newer / "20261231000000_next.sql").write_text("create table public.ourvidz_next (id int);\n")

    class Newer(Settings):
        @property
        def migrations_dir(self) -> Path:
            return newer

    with pytest.raises(db.MigrationRefused, match=r"20261231000000_next\.sql.*supabase export.*supabase db push"):
        db.migrate(url, Newer())
    assert tables(url, "public.ourvidz_next") == []
    exported = export_migrations(db.discover_migrations(newer), project.folder)
    assert [m.version for m in exported.written] == ["20261231000000"] and len(exported.unchanged) == len(OURS)
    code, output = project.push(url)
    assert code == 0 and "Applying migration 20261231000000_next.sql" in output, output
    assert db.migrate(url, Newer()) == []


def test_export_after_their_newer_migrations(new_database: Callable[[], str], project: Project) -> None:
    url = supabase_project(new_database())
    project.add("20270101000000", "todos", THEIRS[2])  # theirs first, and newer than all of ours
    assert project.push(url)[0] == 0
    export(project.folder)
    code, output = project.push(url)
    assert code != 0 and "--include-all" in output, output  # the CLI's rule for files older than its last
    code, output = project.push(url, "--include-all")
    assert code == 0, output
    assert cli_history(url) == [*OURS, "20270101000000"] and db.migrate(url) == []


def test_export_after_migrate_tells_the_cli_what_migrate_applied(
    new_database: Callable[[], str], project: Project,
) -> None:
    url = supabase_project(new_database())
    db.migrate(url)
    project.add(*THEIRS)
    assert project.push(url)[0] == 0
    output = export(project.folder, "--database-url", url)
    [repair] = [line.strip() for line in output.splitlines() if line.strip().startswith("supabase migration repair")]
    assert repair == f"supabase migration repair --status applied {' '.join(OURS)} --linked"
    code, repaired = project.run(*repair.split()[1:-1], f"--remote={cli_url(url)}")
    assert code == 0, repaired
    code, output = project.push(url)
    assert code == 0 and "up to date" in output, output  # nothing of ours is applied a second time
    assert cli_history(url) == sorted([THEIRS[0], *OURS]) and db.migrate(url) == []


def test_export_refuses_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    result = CliRunner().invoke(app, ["supabase", "export", "--dir", str(folder)])
    assert result.exit_code == 1 and "no Supabase project" in result.output and not folder.exists()
    folder.mkdir()
    first = db.discover_migrations(Settings().migrations_dir)[0]
    (folder / f"{first.version}_their_own.sql").write_text("select 1;")
    result = CliRunner().invoke(app, ["supabase", "export", "--dir", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{first.version}_their_own.sql has version {first.version}" in result.output
    assert sorted(p.name for p in folder.iterdir()) == [f"{first.version}_their_own.sql"]

    (folder / f"{first.version}_their_own.sql").unlink()
    export(folder)
    (folder / first.path.name).write_text("-- edited\n")
    result = CliRunner().invoke(app, ["supabase", "export", "--dir", str(folder)])
    assert result.exit_code == 1 and "differs" in result.output
    export(folder, "--force")
    assert (folder / first.path.name).read_bytes() == first.path.read_bytes()
