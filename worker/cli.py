"""ourvidz-worker: migrate | run | enqueue | jobs | types | demo."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any, NoReturn
from uuid import UUID

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from worker import db
from worker.config import Settings
from worker.handlers.base import Handler, builtin_handlers, load_handler
from worker.health import HealthServer
from worker.loop import Worker
from worker.queue import JobQueue, WorkerIdInUse
from worker.storage import Storage
from worker.storage import make_storage as storage_backend
from worker.supabase_cli import supabase_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
types_app = typer.Typer(help="List job types, or register one served by a custom handler.")
app.add_typer(types_app, name="types")
app.add_typer(supabase_app, name="supabase")
console = Console()

TERMINAL = {"completed", "failed", "canceled"}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> NoReturn:
    """A person's mistake or a refusal: one sentence on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _database(settings: Settings) -> str:
    """The database URL; the embedded server is started and migrated on first use."""
    url = db.resolve_database_url(settings)
    if not settings.database_url:
        db.migrate(url, settings)
    return url


def _queue(settings: Settings) -> JobQueue:
    return JobQueue(db.make_pool(_database(settings), 2, name="cli"))


def make_storage(settings: Settings) -> Storage:
    """LocalStorage under HOME/storage, or Supabase Storage when OURVIDZ_STORAGE_BACKEND=supabase."""
    return storage_backend(settings)


@app.command()
def migrate() -> None:
    """Apply sql/migrations to DATABASE_URL (or the embedded server), recording them as the Supabase CLI does."""
    _setup_logging()
    settings = Settings()
    applied = db.migrate(db.resolve_database_url(settings), settings)
    console.print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version}_{m.name}" for m in applied))


@app.command()
def run(
    ctx: typer.Context,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues; default all.")] = None,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many jobs.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Jobs run at once.")] = None,
    handler: Annotated[list[str] | None, typer.Option(help="NAME=module:attr, repeatable.")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Safety poll seconds while LISTEN works.")] = None,
    lease_seconds: Annotated[float | None, typer.Option(help="Lease of a claimed job.")] = None,
    no_listen: Annotated[bool, typer.Option("--no-listen", help="Poll only (transaction poolers).")] = False,
    shutdown_grace: Annotated[float | None, typer.Option(help="Seconds jobs get after SIGTERM.")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Defaults to host-pid.")] = None,
    health_port: Annotated[int | None, typer.Option(help="Serve /health, /status, /metrics on this port.")] = None,
    gpus: Annotated[str | None, typer.Option(
        help="all | 0,1: one supervised worker process per GPU (CUDA_VISIBLE_DEVICES), ids <worker-id>-gpuN, "
             "ports +N; the other options pass through.")] = None,
    verbose: bool = False,
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
    server = _health_server(worker, settings)
    try:
        stats = worker.run()
    except WorkerIdInUse as err:
        _fail(str(err))
    finally:
        if server is not None:
            server.stop()
    console.print(f"worker stopped: {stats}")
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
        handlers[name] = load_handler(target)
    return handlers


@app.command()
def enqueue(
    job_type: Annotated[str, typer.Argument(help="A job type, e.g. sdxl_image_fast.")],
    prompt: Annotated[str | None, typer.Option(help="Sets payload.prompt.")] = None,
    payload: Annotated[str | None, typer.Option(help="Payload JSON.")] = None,
    priority: int = 0,
    user: Annotated[str | None, typer.Option(help="Owner (auth.users id).")] = None,
    max_attempts: int | None = None,
) -> None:
    """Insert a job as a frontend would; prints its id."""
    body = json.loads(payload) if payload else {}
    if not isinstance(body, dict):
        raise typer.BadParameter("payload must be a JSON object", param_hint="--payload")
    if prompt is not None:
        body["prompt"] = prompt
    job_id = _queue(Settings()).enqueue(job_type, body, priority=priority, user_id=user,
                                        max_attempts=max_attempts)
    print(job_id)


@app.command()
def jobs(
    limit: int = 20,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    watch: Annotated[str | None, typer.Option(help="Follow one job until it ends.")] = None,
) -> None:
    """List recent jobs, or follow one with --watch ID (through Supabase Realtime when SUPABASE_URL is set)."""
    if watch:
        raise typer.Exit(_watch(Settings(), UUID(watch)))
    queue = _queue(Settings())
    table = Table("id", "type", "status", "progress", "stage", "attempts", "wait s", "run s", "error")
    for row in queue.recent_jobs(limit, status):
        table.add_row(
            str(row["id"]), row["job_type"], _status(row["status"]), f"{row['progress']}%", row["stage"] or "",
            f"{row['attempts']}/{row['max_attempts']}", _secs(row["wait_seconds"]),
            _secs(row["run_seconds"]) if row["started_at"] else "",
            (row["error"] or {}).get("code", ""),
        )
    console.print(table)


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

        queue = _queue(settings)
        try:
            row = follow(queue, [job_id], console)[0]
        except LookupError as err:
            console.print(f"[red]{err}[/]")
            return 2
        finally:
            queue.pool.close()
    console.print_json(json.dumps({k: row[k] for k in ("status", "result", "error")}, default=str))
    return 0 if row["status"] == "completed" else 1


@types_app.callback(invoke_without_command=True)
def types_list(ctx: typer.Context) -> None:
    """List job types."""
    if ctx.invoked_subcommand:
        return
    table = Table("name", "queue", "handler", "bucket", "max attempts", "enabled", "defaults")
    for row in _queue(Settings()).list_job_types():
        table.add_row(row["name"], row["queue"], row["handler"], row["bucket"] or "", str(row["max_attempts"]),
                      "yes" if row["enabled"] else "no", json.dumps(row["defaults"])[:60])
    console.print(table)


@types_app.command("add")
def types_add(
    name: str,
    handler: Annotated[str, typer.Option(help="Handler name, served with run --handler NAME=module:attr.")],
    queue: Annotated[str, typer.Option(help="Queue the type's jobs go to.")],
    defaults: Annotated[str | None, typer.Option(help="Default config JSON.")] = None,
    max_attempts: int = 3,
    bucket: str | None = None,
    content_type: str | None = None,
) -> None:
    """Register (or update) a job type."""
    config = json.loads(defaults) if defaults else {}
    _queue(Settings()).upsert_job_type(name, queue, handler, defaults=config, max_attempts=max_attempts,
                                       bucket=bucket, content_type=content_type)
    console.print(f"job type {name} -> handler {handler} on queue {queue}")


@app.command()
def demo(
    concurrency: Annotated[int, typer.Option(help="Jobs run at once.")] = 2,
) -> None:
    """Start the embedded defaults, enqueue a few jobs, run a worker and show them live."""
    from worker.demo import run_demo

    _setup_logging()
    logging.getLogger("worker").setLevel(logging.WARNING)
    ok = run_demo(Settings(), console, concurrency)
    raise typer.Exit(0 if ok else 1)


def _status(status: str) -> str:
    color = {"completed": "green", "failed": "red", "canceled": "yellow", "processing": "cyan"}.get(status, "white")
    return f"[{color}]{status}[/]"


def _secs(value: Any) -> str:
    return f"{float(value):.2f}" if value is not None else ""


if __name__ == "__main__":
    sys.exit(app())
