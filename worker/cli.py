"""ourvidz-worker: migrate | run | enqueue | jobs | types | demo | supabase."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any, NoReturn
from uuid import UUID

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from worker import db, logs
from worker.cli_errors import USAGE, CliError, connection_error, run_cli
from worker.config import Settings
from worker.handlers.base import Handler, builtin_handlers, load_handler
from worker.health import HealthServer
from worker.loop import Worker
from worker.queue import JobQueue, WorkerIdInUse
from worker.storage import Storage
from worker.storage import make_storage as storage_backend
from worker.supabase_cli import supabase_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
types_app = typer.Typer(help="List job types, or register one served by a custom handler.")
app.add_typer(types_app, name="types")
app.add_typer(supabase_app, name="supabase")
console = Console()

TERMINAL = {"completed", "failed", "canceled"}
JobStatus = Enum("JobStatus", {s: s for s in ("queued", "processing", "completed", "failed", "canceled")}, type=str)
ContentType = Enum("ContentType", {s: s for s in ("image", "video", "text")}, type=str)
Verbose = Annotated[bool, typer.Option("--verbose", help="Debug logs, and the traceback of an unexpected error.")]
_verbose = False


def _setup_logging(verbose: bool = False) -> None:
    global _verbose
    _verbose = _verbose or verbose
    try:
        logs.configure(verbose=_verbose)
    except ValueError as err:
        raise CliError(str(err), USAGE) from None


@app.callback()
def _options(verbose: Verbose = False) -> None:
    _setup_logging(verbose)


def _fail(message: str, code: int = 1) -> NoReturn:
    """A person's mistake or a refusal: one sentence on stderr and a non-zero exit, no traceback."""
    raise CliError(message, code)


def _reachable(url: str, settings: Settings) -> None:
    """Connect once first: a wrong URL says why at once, not after a pool's 10 s of retries."""
    try:
        with db.connect(url, settings):
            pass
    except psycopg.Error as err:
        raise connection_error(err, settings.db_connect_timeout) from None


def _database(settings: Settings) -> str:
    """The database URL; the embedded server is started and migrated on first use."""
    url = db.resolve_database_url(settings)
    _reachable(url, settings)
    if not settings.database_url:
        db.migrate(url, settings)
    return url


@contextmanager
def _queue(settings: Settings) -> Iterator[JobQueue]:
    pool = db.make_pool(_database(settings), 2, name="cli", settings=settings)
    try:
        yield JobQueue(pool)
    finally:
        pool.close()


def make_storage(settings: Settings) -> Storage:
    """LocalStorage under HOME/storage, or Supabase Storage when OURVIDZ_STORAGE_BACKEND=supabase."""
    return storage_backend(settings)


@app.command()
def migrate(verbose: Verbose = False) -> None:
    """Apply sql/migrations to DATABASE_URL (or the embedded server), recording them as the Supabase CLI does."""
    _setup_logging(verbose)
    settings = Settings()
    url = db.resolve_database_url(settings)
    _reachable(url, settings)
    try:
        applied = db.migrate(url, settings)
    except db.MigrationRefused as err:
        _fail(str(err))
    console.print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version}_{m.name}" for m in applied))


@app.command()
def run(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues; default all.")] = None,
    max_jobs: Annotated[int | None, typer.Option(min=0, help="Exit after this many jobs.")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, max=256, help="Jobs run at once.")] = None,
    handler: Annotated[list[str] | None, typer.Option(help="NAME=module:attr, repeatable.")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Safety poll seconds while LISTEN works.")] = None,
    lease_seconds: Annotated[float | None, typer.Option(help="Lease of a claimed job.")] = None,
    no_listen: Annotated[bool, typer.Option("--no-listen", help="Poll only (transaction poolers).")] = False,
    shutdown_grace: Annotated[float | None, typer.Option(help="Seconds jobs get after SIGTERM.")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Defaults to host-pid.")] = None,
    health_port: Annotated[int | None, typer.Option(min=0, max=65535,
                                                    help="Serve /health, /status, /metrics on this port.")] = None,
    gpus: Annotated[str | None, typer.Option(
        help="all | 0,1: one supervised worker process per GPU (CUDA_VISIBLE_DEVICES), ids <worker-id>-gpuN, "
             "ports +N; the other options pass through.")] = None,
    preload: Annotated[bool, typer.Option("--preload", help="Load and warm every served model before the first "
                                          "claim; one that fails is not claimed for.")] = False,
    verbose: Verbose = False,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or --max-jobs)."""
    _setup_logging(verbose)
    overrides: dict[str, Any] = {
        "queues": [q.strip() for q in queues.split(",") if q.strip()] if queues else None,
        "concurrency": concurrency, "poll_interval": poll_interval, "lease_seconds": lease_seconds,
        "shutdown_grace": shutdown_grace, "worker_id": worker_id, "health_port": health_port,
        "listen": False if no_listen else None,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None}, hang_watchdog=True)
    handlers = _handlers(handler or [])
    url = _database(settings)
    if gpus is not None:
        from worker.supervisor import supervise

        raise typer.Exit(supervise(gpus, settings, ctx))
    from worker.preflight import PreflightError, preflight

    try:  # check before claiming: one sentence and a non-zero exit for what cannot work here
        storage, faults = preflight(settings, handlers, url, make_storage(settings))
    except (PreflightError, ValueError) as err:
        _fail(getattr(err, "message", str(err)), getattr(err, "code", 2))
    worker = Worker(settings, handlers, storage, database_url=url, max_jobs=max_jobs)
    worker.add_faults(faults)  # what only part of the work suffers from: those scopes start closed
    worker.preload = preload  # type: ignore[attr-defined]  # read by Worker.run (worker.preload)
    server = _health_server(worker, settings)
    try:
        stats = worker.run()
    except WorkerIdInUse as err:
        _fail(str(err))
    finally:
        if server is not None:
            server.stop()
    print(f"worker stopped: {stats}")
    if worker.exit_reason:
        _fail(worker.exit_reason, code=3)  # a handler that would not stop: the supervisor restarts us


def _health_server(worker: Worker, settings: Settings) -> HealthServer | None:
    if settings.health_port is None:
        return None
    try:
        return HealthServer(worker, settings.health_host, settings.health_port).start()
    except OSError as err:
        worker.pool.close()
        raise typer.BadParameter(f"cannot serve on {settings.health_host}:{settings.health_port}: {err}",
                                 param_hint="--health-port / OURVIDZ_HEALTH_PORT") from err


def _handlers(specs: list[str]) -> dict[str, Handler]:
    handlers = builtin_handlers()
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            raise typer.BadParameter(f"{spec!r} is not NAME=module:attr", param_hint="--handler")
        try:
            handlers[name] = load_handler(target)
        except (ImportError, AttributeError, ValueError, TypeError) as err:
            raise typer.BadParameter(f"cannot load {target!r}: {err}", param_hint="--handler") from None
    return handlers


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not valid JSON ({err.msg} at character {err.pos})", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"must be a JSON object, not {type(value).__name__}", param_hint=option)
    return value


def _uuid(text: str, option: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a UUID", param_hint=option) from None


@app.command()
def enqueue(
    job_type: Annotated[str, typer.Argument(help="A job type, e.g. sdxl_image_fast.")],
    prompt: Annotated[str | None, typer.Option(help="Sets payload.prompt.")] = None,
    payload: Annotated[str | None, typer.Option(help="Payload JSON object.")] = None,
    priority: Annotated[int, typer.Option(min=-100, max=100, help="Higher runs first.")] = 0,
    user: Annotated[str | None, typer.Option(help="Owner (auth.users id).")] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, max=20)] = None,
    verbose: Verbose = False,
) -> None:
    """Insert a job as a frontend would; prints its id."""
    _setup_logging(verbose)
    body = _json_object(payload, "--payload") or {}
    owner = str(_uuid(user, "--user")) if user is not None else None
    if prompt is not None:
        body["prompt"] = prompt
    with _queue(Settings()) as queue:
        job_id = queue.enqueue(job_type, body, priority=priority, user_id=owner, max_attempts=max_attempts)
    print(job_id)


@app.command()
def jobs(
    limit: Annotated[int, typer.Option(min=1)] = 20,
    status: Annotated[JobStatus | None, typer.Option(help="Only this status.")] = None,
    watch: Annotated[str | None, typer.Option(help="Follow one job until it ends.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of the rows, full values.")] = False,
    verbose: Verbose = False,
) -> None:
    """List recent jobs, or follow one with --watch ID (through Supabase Realtime when SUPABASE_URL is set).

    On a terminal, a table (ids always whole); piped, plain aligned columns, never cut; --json for scripts."""
    _setup_logging(verbose)
    if watch:
        raise typer.Exit(_watch(Settings(), _uuid(watch, "--watch")))
    with _queue(Settings()) as queue:
        rows = queue.recent_jobs(limit, status.value if status else None)
    if as_json:
        print(json.dumps(rows, default=_json_value, indent=2))
        return
    _print_table(
        ["id", "type", "status", "progress", "stage", "attempts", "wait s", "run s", "error"],
        [[str(row["id"]), row["job_type"], row["status"], f"{row['progress']}%", row["stage"] or "",
          f"{row['attempts']}/{row['max_attempts']}", _secs(row["wait_seconds"]),
          _secs(row["run_seconds"]) if row["started_at"] else "", (row["error"] or {}).get("code", "")]
         for row in rows],
        whole=("id",), styles={"status": _status},
    )


def _watch(settings: Settings, job_id: UUID) -> int:
    from worker.watch import watch_backend

    if watch_backend(settings) == "supabase":
        import asyncio

        from worker.watch import watch_supabase

        def show(row: dict[str, Any], source: str) -> None:
            console.print(f"{_status(row['status'])} {row.get('progress', 0)}% {row.get('stage') or ''}"
                          f" [dim]({source})[/]")

        try:
            row = asyncio.run(watch_supabase(settings, job_id, show))
        except (LookupError, TimeoutError) as err:
            console.print(f"[red]{err or 'timed out'}[/]")
            return 2
    else:
        if settings.supabase_url:
            console.print("[yellow]SUPABASE_URL is set but SUPABASE_SERVICE_ROLE_KEY is not: "
                          "following the job in the database instead of through Realtime[/]")
        from worker.demo import follow

        with _queue(settings) as queue:
            try:
                row = follow(queue, [job_id], console)[0]
            except LookupError as err:
                console.print(f"[red]{err}[/]")
                return 2
    console.print_json(json.dumps({k: row[k] for k in ("status", "result", "error")}, default=str))
    return 0 if row["status"] == "completed" else 1


@types_app.callback(invoke_without_command=True)
def types_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of the rows, full values.")] = False,
    verbose: Verbose = False,
) -> None:
    """List job types."""
    _setup_logging(verbose)
    if ctx.invoked_subcommand:
        return
    with _queue(Settings()) as queue:
        rows = queue.list_job_types()
    if as_json:
        print(json.dumps(rows, default=_json_value, indent=2))
        return
    cut = 60 if console.is_terminal else None
    _print_table(
        ["name", "queue", "handler", "bucket", "max attempts", "enabled", "defaults"],
        [[row["name"], row["queue"], row["handler"], row["bucket"] or "", str(row["max_attempts"]),
          "yes" if row["enabled"] else "no", json.dumps(row["defaults"])[:cut]] for row in rows],
        whole=("name",),
    )


@types_app.command("add")
def types_add(
    name: str,
    handler: Annotated[str | None, typer.Option(
        help="Handler name, served with run --handler NAME=module:attr (a new type needs it).")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue the type's jobs go to (a new type needs it).")] = None,
    defaults: Annotated[str | None, typer.Option(help="Default config JSON object (replaces the old one).")] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, max=20, help="A new type: 3.")] = None,
    bucket: str | None = None,
    content_type: ContentType | None = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable", help="A new type: enabled.")] = None,
    verbose: Verbose = False,
) -> None:
    """Register a job type, or change only the given options of an existing one."""
    _setup_logging(verbose)
    config = _json_object(defaults, "--defaults")
    with _queue(Settings()) as jobs_queue:
        try:
            row = jobs_queue.upsert_job_type(name, queue, handler, defaults=config, max_attempts=max_attempts,
                                             bucket=bucket, content_type=content_type.value if content_type else None,
                                             enabled=enabled)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--queue / --handler") from None
    verb = "created" if row["created"] else "updated"
    print(f"job type {name} {verb}: handler {row['handler']} on queue {row['queue']}, "
          f"max attempts {row['max_attempts']}, {'enabled' if row['enabled'] else 'disabled'}")


@app.command()
def demo(
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Jobs run at once.")] = 2,
    verbose: Verbose = False,
) -> None:
    """Start the embedded defaults, enqueue a few jobs, run a worker and show them live."""
    from worker.demo import run_demo

    _setup_logging(verbose)
    if not verbose:
        logging.getLogger("worker").setLevel(logging.WARNING)
    ok = run_demo(Settings(), console, concurrency)
    raise typer.Exit(0 if ok else 1)


def _print_table(headers: list[str], rows: list[list[str]], *, whole: Sequence[str] = (),
                 styles: dict[str, Any] | None = None) -> None:
    """A Rich table on a terminal (the `whole` columns never cut or wrapped); else plain aligned
    columns at full width, for grep, awk and log files."""
    styles = styles or {}
    if console.is_terminal:
        table = Table()
        for header in headers:
            if header in whole:
                table.add_column(header, no_wrap=True, min_width=max(len(r[headers.index(header)]) for r in rows)
                                 if rows else None)
            else:
                table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(styles[h](cell) if h in styles else cell for h, cell in zip(headers, row, strict=True)))
        console.print(table)
        return
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def _status(status: str) -> str:
    color = {"completed": "green", "failed": "red", "canceled": "yellow", "processing": "cyan"}.get(status, "white")
    return f"[{color}]{status}[/]"


def _secs(value: Any) -> str:
    return f"{float(value):.2f}" if value is not None else ""


def main(argv: list[str] | None = None) -> int:
    """The console script: every error a sentence (see worker.cli_errors)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return run_cli(lambda: typer.main.get_command(app), args, lambda: _verbose or "--verbose" in args)


if __name__ == "__main__":
    sys.exit(main())
