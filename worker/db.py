"""Connections, the embedded server, and the migration runner (Supabase CLI compatible)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from worker.config import Settings

log = logging.getLogger(__name__)

Connection = psycopg.Connection[dict[str, Any]]

# Errors after which a retry on a fresh connection may succeed (restart, failover, network).
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


class EmbeddedPostgres:
    """A private Postgres server under OURVIDZ_HOME, from the pgserver wheel (no system install).

    The server is shared by every process that opens the same folder and stops when the last
    one exits, so `run`, `enqueue` and `jobs` in three terminals see one database.
    """

    def __init__(self, pgdata: Path) -> None:
        import pgserver

        pgdata.parent.mkdir(parents=True, exist_ok=True)
        self.pgdata = pgdata
        self._server = pgserver.get_server(pgdata, cleanup_mode="stop")

    @property
    def url(self) -> str:
        return self._server.get_uri()

    def restart(self) -> None:
        from pgserver import _commands

        _commands.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.pgdata, user=self._server.system_user)

    def stop(self) -> None:
        self._server.cleanup()
        if (self.pgdata / "postmaster.pid").exists():
            # pgserver's bookkeeping can miss a server restarted behind its back (restart above)
            from pgserver import _commands

            _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)


_embedded: dict[Path, EmbeddedPostgres] = {}


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL when set, else the embedded server (started on first use)."""
    if settings.database_url:
        return settings.database_url
    pgdata = settings.embedded_pgdata
    if pgdata not in _embedded:
        log.info("starting embedded Postgres in %s", pgdata)
        _embedded[pgdata] = EmbeddedPostgres(pgdata)
    return _embedded[pgdata].url


class BoundedConnection(psycopg.Connection[dict[str, Any]]):
    """A connection that gives up on a reply after `reply_timeout` seconds and closes itself.

    TCP keepalives find a dead peer only where nothing answers at the TCP level; a proxy or
    pooler whose far side is partitioned keeps answering them, and a statement sent into it
    would wait forever. The closed connection raises OperationalError, which the worker's
    callers already retry on a fresh connection.
    """

    reply_timeout: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None or not self.reply_timeout:  # notifies(timeout=…) sets its own
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.reply_timeout)
        except psycopg.errors._WaitTimeout:
            self.close()
            raise psycopg.OperationalError(
                f"no reply from the database in {self.reply_timeout:g}s; connection dropped"
            ) from None


def connection_options(settings: Settings) -> dict[str, Any]:
    """libpq parameters for every connection: a connect timeout and TCP keepalives (ignored on
    Unix sockets). Parameters written in the URL itself win."""
    return {
        "connect_timeout": settings.db_connect_timeout,
        "keepalives": 1,
        "keepalives_idle": settings.db_keepalives_idle,
        "keepalives_interval": settings.db_keepalives_interval,
        "keepalives_count": settings.db_keepalives_count,
    }


def with_options(url: str, settings: Settings) -> str:
    given = conninfo_to_dict(url)
    return make_conninfo(url, **{k: v for k, v in connection_options(settings).items() if k not in given})


def connect(url: str, settings: Settings | None = None, *, reply_timeout: float | None = None,
            **kwargs: Any) -> Connection:
    """One autocommit connection with connection_options; `settings` defaults to the environment.
    No statement or reply timeout unless asked for: migrations may run long."""
    conn = BoundedConnection.connect(with_options(url, settings or Settings()), autocommit=True,
                                     row_factory=dict_row, **kwargs)
    conn.reply_timeout = reply_timeout
    return conn


def configure_session(conn: Connection, settings: Settings, *, async_commit: bool,
                      session_settings: bool = True) -> None:
    """What every worker connection runs with: async commit (when asked; a session setting, so not
    for transaction-mode poolers), db_statement_timeout (not with `session_settings=False`, which
    make_pool passes with prepare=False) and db_reply_timeout."""
    if async_commit:
        conn.execute("SET synchronous_commit TO off")
    if session_settings and (statement_ms := round(settings.db_statement_timeout * 1000)):
        conn.execute(f"SET statement_timeout = {statement_ms}")
    if isinstance(conn, BoundedConnection):
        conn.reply_timeout = settings.db_reply_timeout


def make_pool(url: str, size: int, name: str = "ourvidz", *, prepare: bool = True,
              check: bool = True, async_commit: bool = False,
              settings: Settings | None = None) -> ConnectionPool[Connection]:
    """`prepare=False` for transaction-mode poolers, which may not keep a prepared statement
    between transactions on the same server connection. `check=False` skips the liveness round
    trip on every checkout, for callers that retry a statement a restart broke (the worker).
    `async_commit=True` commits without waiting for the WAL flush unless a statement asks for it
    (see JobQueue._execute). Every connection gets connection_options, db_statement_timeout
    (a session setting, so not with prepare=False) and db_reply_timeout; `settings` defaults to
    the environment."""
    settings = settings or Settings()

    def configure(conn: Connection) -> None:
        conn.autocommit = True
        configure_session(conn, settings, async_commit=async_commit, session_settings=prepare)

    return ConnectionPool(
        with_options(url, settings),
        connection_class=BoundedConnection,
        min_size=1,
        max_size=size,
        kwargs={"row_factory": dict_row, "autocommit": True, **({} if prepare else {"prepare_threshold": None})},
        configure=configure,
        check=ConnectionPool.check_connection if check else None,
        name=name,
        open=True,
        timeout=10.0,  # a caller waits this long for a connection, then retries or backs off
    )


# --- migrations ---------------------------------------------------------------------------

MIGRATION_NAME = re.compile(r"^(\d{14})_(.+)\.sql$")
MIGRATION_LOCK_KEY = 0x6F75727669647A  # "ourvidz": one migrator at a time


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def statements(self) -> list[str]:
        return split_statements(self.path.read_text())


def discover_migrations(folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"{path.name}: migrations are named <YYYYMMDDHHMMSS>_<name>.sql")
        found.append(Migration(match.group(1), match.group(2), path))
    return found


def split_statements(sql: str) -> list[str]:
    """Split a script into statements the way the Supabase CLI records them.

    Semicolons inside quotes, identifiers, comments and dollar-quoted bodies do not split.
    """
    statements: list[str] = []
    start = i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if c == "'" or c == '"':
            i = _skip_quoted(sql, i, c)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "$":
            tag = re.match(r"\$[A-Za-z_]*\$", sql[i:])
            if tag:
                end = sql.find(tag.group(0), i + len(tag.group(0)))
                i = n if end == -1 else end + len(tag.group(0))
            else:
                i += 1
        elif c == ";":
            _append_statement(statements, sql[start : i + 1])
            start = i = i + 1
        else:
            i += 1
    _append_statement(statements, sql[start:])
    return statements


def _skip_quoted(sql: str, i: int, quote: str) -> int:
    i += 1
    while i < len(sql):
        if sql[i] == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return i


def _skip_block_comment(sql: str, i: int) -> int:
    depth = 0
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return i


def _append_statement(statements: list[str], text: str) -> None:
    body = "\n".join(line for line in text.strip().splitlines() if not line.strip().startswith("--"))
    if body.strip().rstrip(";").strip():
        statements.append(text.strip().removesuffix(";").rstrip())  # the CLI records them without it


class MigrationRefused(RuntimeError):
    """`migrate` will not apply what another tool deploys; the message says what to run instead."""


def is_supabase(conn: Connection) -> bool:
    """Whether THIS database (not merely its cluster) is a Supabase project's.

    Supabase Auth keeps its own migration history in `auth.schema_migrations` next to
    `auth.users`, and Storage has `storage.buckets`. Our bootstrap creates `auth.users` and
    `storage.buckets` on vanilla Postgres but never Auth's history, so a database we bootstrapped
    is never taken for a project; a second database of a Supabase cluster (which has the
    cluster's roles but none of these schemas) is not one either, and gets the bootstrap.
    """
    row = conn.execute(
        "select to_regclass('auth.users') is not null and to_regclass('auth.schema_migrations') is not null"
        " and to_regclass('storage.buckets') is not null as yes"
    ).fetchone()
    return bool(row and row["yes"])


@dataclass(frozen=True)
class History:
    """Where `migrate` records what it applied, and what counts as applied already."""

    table: tuple[str, str]
    applied: frozenset[str]
    # Versions of ours that the Supabase CLI applied (`supabase export` + `supabase db push`).
    deployed_by_cli: frozenset[str]


CLI_HISTORY = ("supabase_migrations", "schema_migrations")
OWN_HISTORY = ("ourvidz", "schema_migrations")


def _table(name: tuple[str, str]) -> psycopg.sql.Identifier:
    return psycopg.sql.Identifier(*name)


def _recorded(conn: Connection, table: tuple[str, str]) -> set[str] | None:
    row = conn.execute("select to_regclass(%s) is not null as yes", (".".join(table),)).fetchone()
    if not (row and row["yes"]):
        return None
    rows = conn.execute(psycopg.sql.SQL("select version from {}").format(_table(table))).fetchall()
    return {r["version"] for r in rows}


def migration_history(conn: Connection, migrations: list[Migration], supabase: bool) -> History:
    """Our versions go into the Supabase CLI's history only on a database of our own: not a
    Supabase project, and no versions in it but ours. Anywhere else a version there that the
    team's `supabase/migrations` lacks would make their next `supabase db push` fail ("Remote
    migration versions not found in local migrations directory"), so we keep our own table.
    Versions of ours that the CLI applied count as applied in both cases."""
    ours = {m.version for m in migrations}
    cli = _recorded(conn, CLI_HISTORY)
    own = _recorded(conn, OWN_HISTORY)
    if not supabase and not own and not (cli or set()) - ours:
        conn.execute("create schema if not exists supabase_migrations")
        conn.execute("create table if not exists supabase_migrations.schema_migrations"
                     " (version text not null primary key, statements text[], name text)")
        return History(CLI_HISTORY, frozenset(cli or ()), frozenset())
    conn.execute("create schema if not exists ourvidz")
    conn.execute("create table if not exists ourvidz.schema_migrations (version text not null primary key,"
                 " statements text[], name text, applied_at timestamptz not null default now())")
    by_cli = frozenset((cli or set()) & ours)
    return History(OWN_HISTORY, frozenset(own or ()) | by_cli, by_cli)


def migrate(url: str, settings: Settings | None = None) -> list[Migration]:
    """Apply pending migrations in order, each in one transaction, recorded with the statements
    `supabase db push` would record (see migration_history for where). Idempotent.

    Raises MigrationRefused when our migrations are deployed with the Supabase CLI on this
    database and some are pending: applying them here would make `supabase db push` apply them
    a second time."""
    settings = settings or Settings()
    applied_now: list[Migration] = []
    with connect(url) as conn:
        conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            supabase = is_supabase(conn)
            if not supabase:
                with conn.transaction():
                    for statement in split_statements(settings.bootstrap_file.read_text()):
                        conn.execute(statement.encode())
            migrations = discover_migrations(settings.migrations_dir)
            history = migration_history(conn, migrations, supabase)
            pending = [m for m in migrations if m.version not in history.applied]
            if pending and history.deployed_by_cli:
                names = ", ".join(m.path.name for m in pending)
                raise MigrationRefused(
                    f"this database gets the ourvidz migrations through the Supabase CLI, so apply {names}"
                    " the same way: `ourvidz-worker supabase export` into the project's supabase/migrations,"
                    " then `supabase db push`")
            for migration in pending:
                statements = migration.statements
                with conn.transaction():
                    for statement in statements:
                        conn.execute(statement.encode())
                    conn.execute(
                        psycopg.sql.SQL("insert into {} (version, name, statements) values (%s, %s, %s)").format(
                            _table(history.table)),
                        (migration.version, migration.name, statements),
                    )
                log.info("applied migration %s_%s", migration.version, migration.name)
                applied_now.append(migration)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now
