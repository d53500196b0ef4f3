#!/usr/bin/env python
"""Queue benchmark: drain throughput, pickup latency and idle load of our worker, and optionally of
PGQueuer and Procrastinate, on one Postgres database in one run. It prints figures; it is not a test.

    python scripts/bench_queue.py                                   # our worker, throwaway server
    python scripts/bench_queue.py --compare pgqueuer,procrastinate --repeat 3
    python scripts/bench_queue.py --jobs 2000 --pickup-count 100 --idle-seconds 5 --repeat 1

Protocol (each figure is the median of --repeat runs; every worker runs in its own spawned process):
  drain   pre-enqueue --jobs no-op jobs in one statement, start one worker with a concurrency limit
          and let it run until all are done: jobs/s = jobs / (last job finished - worker start). The
          start is taken in the worker process just before the worker is built (imports excluded);
          the finish is the database timestamp of the last completion (same host, same clock). A
          drain still running after --drain-cap seconds is stopped and rated on the jobs done by
          then (reported as PARTIAL).
  pickup  one idle worker (LISTEN on); --pickup-count single-row inserts at --pickup-rate per second
          from another connection: latency = handler start - insert commit, both time.time().
  idle    statements the server executes during --idle-seconds with one idle, settled worker:
          sum of pg_stat_statements calls; without the extension, committed + rolled back
          transactions from pg_stat_database (labelled "xacts").

Database: --database-url or DATABASE_URL (its bench tables are truncated!), else a throwaway server:
a system Postgres (initdb/pg_ctl from /usr/lib/postgresql/*/bin, run as the postgres user when root)
with pg_stat_statements preloaded, else the embedded pgserver. Between runs the job tables of every
system are truncated, and the database is vacuumed and analyzed once the jobs of a run are in.
Worker processes import worker/ (and the parent reads sql/) from a copy taken at start, so edits to
the tree during a long run do not mix versions (--live-code to import the tree as it is).

Peers (--compare): `pip install "pgqueuer[asyncpg]==1.6.0" "procrastinate==3.10.0"`. PGQueuer runs
through PgQueuer(AsyncpgDriver(conn)).run() on uvloop as its own benchmark and `pgq run` do (drain
mode, default batch size 10) with `entrypoint(concurrency_limit=N)`, plus one run without a limit
(its default); its PsycopgDriver (--pgqueuer-driver psycopg) crawls here, its notifies() watcher
holding the one shared connection. Procrastinate runs through App(PsycopgConnector)
.run_worker_async(concurrency=N, wait=False). Both get async no-op tasks, their native kind; ours
gets a `concurrent = True` no-op handler.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import glob
import hashlib
import logging
import math
import multiprocessing
import os
import platform
import pwd
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection as Pipe
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SOURCE_REPO = Path(__file__).resolve().parent.parent
SNAPSHOT_ENV = "BENCH_QUEUE_CODE"


def pin_worker_code() -> None:
    """Import worker/ (and read sql/) from a copy taken once at start. Worker processes are spawned
    fresh for every run, so without it an edit to the tree during a long run would mix versions."""
    snapshot = os.environ.get(SNAPSHOT_ENV)
    if snapshot is None:
        if "--live-code" in sys.argv:
            return
        snapshot = tempfile.mkdtemp(prefix="bench-code-")
        for folder in ("worker", "sql"):
            shutil.copytree(SOURCE_REPO / folder, Path(snapshot) / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
        os.environ[SNAPSHOT_ENV] = snapshot  # inherited by the spawned worker processes
        atexit.register(shutil.rmtree, snapshot, True)
    sys.path.insert(0, snapshot)  # ahead of the editable install's finder


if __name__ in ("__main__", "__mp_main__"):
    pin_worker_code()

import bench_claim  # noqa: E402 - scripts/, next to this file; imports worker/ too

from worker import db  # noqa: E402 - after pin_worker_code
from worker.config import REPO_ROOT, Settings  # noqa: E402
from worker.handlers.base import JobContext  # noqa: E402
from worker.jobs import Job  # noqa: E402
from worker.loop import Worker  # noqa: E402
from worker.queue import JobQueue  # noqa: E402
from worker.storage import LocalStorage  # noqa: E402

PHASES = ("drain", "pickup", "idle", "claim", "mixed", "fairness")
BENCH_TYPE = "bench_noop"  # our job type, PGQueuer's entrypoint and Procrastinate's task name
BENCH_QUEUE = "bench"
WARMUP_SEQ = -1
OURS = "ourvidz"
PEERS = ("pgqueuer", "procrastinate")

# Figures measured for the peers on a 2 vCPU machine, Postgres 15 local, medians of 3 (from the brief).
REFERENCE: dict[str, dict[str, float]] = {
    "pgqueuer": {"drain default": 4300, "drain c=16": 2290, "drain c=4": 685, "drain c=1": 157,
                 "pickup p99": 4.0, "idle": 37},
    "procrastinate": {"drain c=16": 570, "drain c=4": 455, "drain c=1": 252, "pickup p99": 4.8, "idle": 28},
}
TARGET_PICKUP_P99_MS = 5.0
TARGET_IDLE_PER_30S = 10.0
TARGET_CLAIM_DB_MS = 1.0  # issue 12: well under a millisecond at any backlog, history and statistics

Conn = db.Connection
Counter = Synchronized  # multiprocessing.Value("q"): handler starts seen by a child, read by the parent
Started = Callable[[], None]  # a child tells the parent its worker is about to run


# ============================================================================================
# The database: a given URL, a throwaway system Postgres, or the embedded pgserver
# ============================================================================================


@dataclass
class Database:
    url: str
    kind: str
    stop: Callable[[], None] = lambda: None
    has_pg_stat_statements: bool = False


def open_database(url: str | None, tcp: bool, pg_options: list[str]) -> Database:
    if url:
        return Database(url, "given URL")
    system = start_system_postgres(tcp, pg_options)
    if system is not None:
        return system
    print("no usable system Postgres; falling back to the embedded pgserver (no pg_stat_statements)")
    return start_embedded_postgres()


def find_pg_bindir() -> Path | None:
    def major(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    if on_path := shutil.which("pg_ctl"):
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_system_postgres(tcp: bool, pg_options: list[str]) -> Database | None:
    bindir = find_pg_bindir()
    if bindir is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            print("running as root and there is no postgres user to run a system Postgres as")
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = tmp / "data", free_port()
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    options = " ".join([f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c max_connections=200",
                        "-c shared_preload_libraries=pg_stat_statements", *(f"-c {o}" for o in pg_options)])
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-l", str(tmp / "server.log"), "-w", "-t", "60", "-o", options, "start"],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as err:
        detail = err.stderr.decode(errors="replace") if isinstance(err, subprocess.CalledProcessError) else ""
        print(f"could not start a system Postgres from {bindir}: {err} {detail}")
        shutil.rmtree(tmp, ignore_errors=True)
        return None

    def stop() -> None:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    host = "127.0.0.1" if tcp else str(tmp)
    admin = make_conninfo(host=host, port=port, user="postgres", dbname="postgres")
    try:
        with db.connect(admin) as conn:
            conn.execute("CREATE DATABASE bench")
    except BaseException:
        stop()
        raise
    kind = f"throwaway system Postgres ({bindir}, {'TCP 127.0.0.1' if tcp else 'unix socket'})"
    return Database(make_conninfo(admin, dbname="bench"), kind, stop)


def start_embedded_postgres() -> Database:
    tmp = Path(tempfile.mkdtemp(prefix="bench-pgserver-"))
    server = db.EmbeddedPostgres(tmp / "pgdata")

    def stop() -> None:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        with db.connect(server.url) as conn:
            conn.execute("CREATE DATABASE bench")
    except BaseException:
        stop()
        raise
    return Database(make_conninfo(server.url, dbname="bench"), "embedded pgserver", stop)


def enable_pg_stat_statements(url: str) -> bool:
    try:
        with db.connect(url) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


# ============================================================================================
# The systems under test, parent side: schema, cleaning, enqueueing, completion timestamps
# ============================================================================================


@dataclass(frozen=True)
class Variant:
    label: str  # "c=4", "default"
    concurrency: int | None  # None: the system's own default (PGQueuer: no limit)


class Inserter(Protocol):
    def insert(self, seq: int) -> None: ...

    def close(self) -> None: ...


class System(Protocol):
    name: str

    def drain_variants(self, concurrencies: list[int]) -> list[Variant]: ...

    def serve_variant(self) -> Variant: ...

    def install(self, url: str) -> None: ...

    def clean(self, conn: Conn) -> None: ...

    def enqueue_bulk(self, url: str, n: int) -> None: ...

    def inserter(self, url: str) -> Inserter: ...

    def finished(self, conn: Conn) -> tuple[int, float | None]:
        """(jobs completed, epoch of the last completion) as the database recorded them."""
        ...


def _finished_row(conn: Conn, sql: str) -> tuple[int, float | None]:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row["n"]), (float(row["last"]) if row["last"] is not None else None)


class OursInserter:
    def __init__(self, url: str) -> None:
        self.pool = db.make_pool(url, 1, name="bench-inserter")
        self.queue = JobQueue(self.pool)

    def insert(self, seq: int) -> None:
        self.queue.enqueue(BENCH_TYPE, {"seq": seq})

    def close(self) -> None:
        self.pool.close()


class Ours:
    name = OURS

    def drain_variants(self, concurrencies: list[int]) -> list[Variant]:
        return [Variant(f"c={c}", c) for c in concurrencies]

    def serve_variant(self) -> Variant:
        return Variant("c=1", 1)  # the default concurrency

    def install(self, url: str) -> None:
        db.migrate(url)
        pool = db.make_pool(url, 1, name="bench-setup")
        try:
            JobQueue(pool).upsert_job_type(BENCH_TYPE, queue=BENCH_QUEUE, handler="noop")
        finally:
            pool.close()

    def clean(self, conn: Conn) -> None:
        conn.execute("TRUNCATE public.jobs")
        conn.execute("DELETE FROM public.workers WHERE id LIKE 'bench-%'")

    def enqueue_bulk(self, url: str, n: int) -> None:
        pool = db.make_pool(url, 1, name="bench-enqueue")
        try:
            JobQueue(pool).enqueue_many(BENCH_TYPE, [{"seq": i} for i in range(n)])
        finally:
            pool.close()

    def inserter(self, url: str) -> Inserter:
        return OursInserter(url)

    def finished(self, conn: Conn) -> tuple[int, float | None]:
        return _finished_row(conn, "SELECT count(*) AS n, extract(epoch FROM max(finished_at)) AS last"
                                   " FROM public.jobs WHERE status = 'completed'")


class PgQueuerInserter:
    def __init__(self, url: str) -> None:
        from pgqueuer.db import SyncPsycopgDriver
        from pgqueuer.queries import SyncQueries

        self.conn = psycopg.connect(url, autocommit=True)
        self.queries = SyncQueries(SyncPsycopgDriver(self.conn))

    def insert(self, seq: int) -> None:
        self.queries.enqueue(BENCH_TYPE, str(seq).encode())

    def close(self) -> None:
        self.conn.close()


class PgQueuerSystem:
    name = "pgqueuer"

    def drain_variants(self, concurrencies: list[int]) -> list[Variant]:
        return [Variant(f"c={c}", c) for c in concurrencies] + [Variant("default", None)]

    def serve_variant(self) -> Variant:
        return Variant("default", None)  # no concurrency limit, batch 10

    def install(self, url: str) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        async def install() -> None:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                queries = Queries(PsycopgDriver(conn))
                if not await queries.schema_is_installed():
                    await queries.install()

        asyncio.run(install())

    def clean(self, conn: Conn) -> None:
        conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    def enqueue_bulk(self, url: str, n: int) -> None:
        inserter = PgQueuerInserter(url)
        try:
            inserter.queries.enqueue([BENCH_TYPE] * n, [b""] * n, [0] * n)
        finally:
            inserter.close()

    def inserter(self, url: str) -> Inserter:
        return PgQueuerInserter(url)

    def finished(self, conn: Conn) -> tuple[int, float | None]:
        return _finished_row(conn, "SELECT count(*) AS n, extract(epoch FROM max(created)) AS last"
                                   " FROM pgqueuer_log WHERE status = 'successful'")


class ProcrastinateInserter:
    def __init__(self, url: str) -> None:
        import procrastinate

        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=url))
        self.app.open()
        self.deferrer = self.app.configure_task(BENCH_TYPE, queue=BENCH_QUEUE)

    def insert(self, seq: int) -> None:
        self.deferrer.defer(seq=seq)

    def close(self) -> None:
        self.app.close()


class ProcrastinateSystem:
    name = "procrastinate"

    def drain_variants(self, concurrencies: list[int]) -> list[Variant]:
        return [Variant(f"c={c}", c) for c in concurrencies]

    def serve_variant(self) -> Variant:
        return Variant("c=1", 1)  # the default concurrency

    def install(self, url: str) -> None:
        with db.connect(url) as conn:
            row = conn.execute("SELECT to_regclass('public.procrastinate_jobs') AS t").fetchone()
        if row and row["t"]:
            return
        inserter = ProcrastinateInserter(url)
        try:
            inserter.app.schema_manager.apply_schema()
        finally:
            inserter.close()

    def clean(self, conn: Conn) -> None:
        conn.execute("TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers,"
                     " procrastinate_workers")

    def enqueue_bulk(self, url: str, n: int) -> None:
        inserter = ProcrastinateInserter(url)
        try:
            args: list[dict[str, Any]] = [{"seq": i} for i in range(n)]
            inserter.deferrer.batch_defer(*args)
        finally:
            inserter.close()

    def inserter(self, url: str) -> Inserter:
        return ProcrastinateInserter(url)

    def finished(self, conn: Conn) -> tuple[int, float | None]:
        return _finished_row(
            conn,
            "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded') AS n,"
            " (SELECT extract(epoch FROM max(at)) FROM procrastinate_events"
            "  WHERE type = 'succeeded') AS last",
        )


def make_systems(compare: list[str]) -> list[System]:
    systems: list[System] = [Ours()]
    for name in compare:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"--compare {name}: not installed; pip install the `bench` extra of pyproject.toml")
        print(f"peer {name} {version}")
        systems.append(PgQueuerSystem() if name == "pgqueuer" else ProcrastinateSystem())
    return systems


# ============================================================================================
# The worker process: one system's worker with a no-op handler, driven over a pipe
# ============================================================================================


@dataclass(frozen=True)
class ChildSpec:
    system: str
    concurrency: int | None
    mode: str  # "drain": run until the pre-enqueued jobs are done; "serve": run until told to stop
    url: str
    jobs: int
    home: str
    pgqueuer_driver: str = "asyncpg"


class Recorder:
    """Handler starts by seq (serve mode only: a drain records nothing, to stay a no-op)."""

    def __init__(self, counter: Counter, record: bool) -> None:
        self.counter = counter
        self.record = record
        self.starts: dict[int, float] = {}

    def hit(self, seq: int) -> None:
        now = time.time()
        self.starts[seq] = now
        with self.counter.get_lock():
            self.counter.value += 1


class Stopper:
    """The parent's "stop" arrives on a thread; the way to stop depends on the system."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._fn: Callable[[], object] | None = None

    def set(self, fn: Callable[[], object]) -> None:
        with self._lock:
            self._fn = fn
            requested = self._requested
        if requested:
            fn()

    def request(self) -> None:
        with self._lock:
            self._requested = True
            fn = self._fn
        if fn is not None:
            fn()


class BenchNoopHandler:
    concurrent = True

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        if self.recorder.record:
            self.recorder.hit(int(job.payload["seq"]))
        return {}


def child_main(spec: ChildSpec, pipe: Pipe, counter: Counter) -> None:
    logging.basicConfig(level=logging.WARNING, format="child %(name)s %(levelname)s: %(message)s")
    recorder = Recorder(counter, record=spec.mode == "serve")
    stopper = Stopper()

    def wait_for_stop() -> None:
        with contextlib.suppress(EOFError, OSError):
            if pipe.recv() == "stop":
                stopper.request()

    threading.Thread(target=wait_for_stop, name="bench-control", daemon=True).start()
    runners = {OURS: run_ours, "pgqueuer": run_pgqueuer, "procrastinate": run_procrastinate}
    result: dict[str, Any] = {"error": None}
    try:
        result["t0"] = runners[spec.system](spec, recorder, stopper, lambda: pipe.send(("started", 0)))
    except BaseException as exc:  # reported to the parent, which fails the run
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["t_exit"] = time.time()
    result["starts"] = recorder.starts
    result["worker_root"] = str(REPO_ROOT)  # the parent checks that both import the same copy
    pipe.send(("result", result))


def run_ours(spec: ChildSpec, recorder: Recorder, stopper: Stopper, started: Started) -> float:
    settings = Settings(database_url=spec.url, concurrency=spec.concurrency or 1, queues=[BENCH_QUEUE],
                        worker_id=f"bench-{uuid.uuid4().hex[:8]}", home=Path(spec.home))
    t0 = time.time()
    worker = Worker(settings, {"noop": BenchNoopHandler(recorder)}, LocalStorage(settings.storage_dir),
                    max_jobs=spec.jobs if spec.mode == "drain" else None)
    stopper.set(worker.stop)
    started()
    worker.run(install_signals=False)
    return t0


def run_pgqueuer(spec: ChildSpec, recorder: Recorder, stopper: Stopper, started: Started) -> float:
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver, PsycopgDriver
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.models import Job as PgqJob
    from pgqueuer.ports.driver import Driver

    logging.getLogger("pgqueuer").setLevel(logging.WARNING)

    async def connect() -> tuple[Driver, Callable[[], Any]]:
        if spec.pgqueuer_driver == "psycopg":
            pconn = await psycopg.AsyncConnection.connect(spec.url, autocommit=True)
            return PsycopgDriver(pconn), pconn.close
        import asyncpg

        params = conninfo_to_dict(spec.url)
        aconn = await asyncpg.connect(host=params.get("host"), port=params.get("port"),
                                      user=params.get("user"), password=params.get("password"),
                                      database=params.get("dbname"))
        return AsyncpgDriver(aconn), aconn.close

    async def main() -> float:
        t0 = time.time()
        driver, close = await connect()
        pgq = PgQueuer(driver)

        @pgq.entrypoint(BENCH_TYPE, concurrency_limit=spec.concurrency or 0)
        async def noop(job: PgqJob) -> None:
            if recorder.record:
                recorder.hit(int(job.payload or b"0"))

        loop = asyncio.get_running_loop()
        stopper.set(lambda: loop.call_soon_threadsafe(pgq.shutdown.set))
        started()
        mode = QueueExecutionMode.drain if spec.mode == "drain" else QueueExecutionMode.continuous
        await pgq.run(mode=mode)
        await close()
        return t0

    try:  # `pgq run` runs on uvloop where it is installed
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


def run_procrastinate(spec: ChildSpec, recorder: Recorder, stopper: Stopper, started: Started) -> float:
    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.WARNING)

    async def main() -> float:
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=spec.url))

        @app.task(name=BENCH_TYPE, queue=BENCH_QUEUE)
        async def noop(seq: int) -> None:
            if recorder.record:
                recorder.hit(seq)

        t0 = time.time()
        async with app.open_async():
            task = asyncio.create_task(app.run_worker_async(
                queues=[BENCH_QUEUE], concurrency=spec.concurrency or 1, wait=spec.mode != "drain",
                install_signal_handlers=False))
            loop = asyncio.get_running_loop()
            stopper.set(lambda: loop.call_soon_threadsafe(task.cancel))
            started()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return t0

    return asyncio.run(main())


class ChildWorker:
    """Parent side of one worker process."""

    def __init__(self, spec: ChildSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.counter: Counter = ctx.Value("q", 0)
        self.pipe, child_end = ctx.Pipe()
        self.process = ctx.Process(target=child_main, args=(spec, child_end, self.counter),
                                   name=f"bench-{spec.system}", daemon=True)
        self.process.start()
        child_end.close()

    def __enter__(self) -> ChildWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)

    def _receive(self, timeout: float) -> tuple[str, Any]:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"{self.spec.system} worker: no word within {timeout:.0f}s")
        try:
            kind, value = self.pipe.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            raise RuntimeError(f"{self.spec.system} worker died (exit code {code})") from None
        if kind == "result" and value["error"]:
            raise RuntimeError(f"{self.spec.system} worker failed: {value['error']}")
        if kind == "result" and value["worker_root"] != str(REPO_ROOT):
            raise RuntimeError(f"worker process imported worker/ from {value['worker_root']}, not {REPO_ROOT}"
                               " as the parent did")
        return kind, value

    def wait_started(self, timeout: float = 120) -> None:
        kind, _ = self._receive(timeout)
        if kind != "started":
            raise RuntimeError(f"{self.spec.system} worker ended before it started")

    def wait_count(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.counter.value < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.system} worker handled {self.counter.value} of {n} jobs")
            if not self.process.is_alive():
                raise RuntimeError(f"{self.spec.system} worker died (exit code {self.process.exitcode})")
            time.sleep(0.005)

    def stop(self) -> None:
        self.pipe.send("stop")

    def result(self, timeout: float) -> dict[str, Any]:
        kind, value = self._receive(timeout)
        assert kind == "result"
        self.process.join(30)
        return dict(value)


# ============================================================================================
# The protocol: drain, pickup, idle
# ============================================================================================


@dataclass
class Bench:
    database: Database
    systems: list[System]
    home: Path
    drain_cap: float
    pgqueuer_driver: str

    @property
    def url(self) -> str:
        return self.database.url

    def spec(self, system: System, variant: Variant, mode: str, jobs: int = 0) -> ChildSpec:
        return ChildSpec(system.name, variant.concurrency, mode, self.url, jobs, str(self.home),
                         self.pgqueuer_driver)

    def clean(self) -> None:
        with db.connect(self.url) as conn:
            for system in self.systems:
                system.clean(conn)
            conn.execute("VACUUM ANALYZE")

    def vacuum(self) -> None:
        with db.connect(self.url) as conn:
            conn.execute("VACUUM ANALYZE")

    def drain(self, system: System, variant: Variant, jobs: int) -> tuple[float, int]:
        """(jobs/s, jobs done). A drain still running after --drain-cap seconds is stopped and
        rated on the jobs it finished by then."""
        self.clean()
        system.enqueue_bulk(self.url, jobs)
        self.vacuum()
        with ChildWorker(self.spec(system, variant, "drain", jobs)) as child:
            child.wait_started()
            try:
                result = child.result(self.drain_cap)
            except TimeoutError:
                child.stop()
                result = child.result(120)
        with db.connect(self.url) as conn:
            done, last = system.finished(conn)
        if not done or last is None or (done < jobs and done < 10):
            raise RuntimeError(f"{system.name} {variant.label}: {done} of {jobs} jobs completed")
        return done / (last - float(result["t0"])), done

    def start_idle_worker(self, system: System, inserter: Inserter, settle: float) -> ChildWorker:
        """A worker that has handled one warm-up job (handler loaded, LISTEN on) and then settled."""
        child = ChildWorker(self.spec(system, system.serve_variant(), "serve"))
        try:
            child.wait_started()
            inserter.insert(WARMUP_SEQ)
            child.wait_count(1, 60)
            time.sleep(settle)
        except BaseException:
            child.__exit__()
            raise
        return child

    def pickup_cli(self, count: int, rate: float, settle: float) -> tuple[dict[int, float], dict[int, float]]:
        """Ours as users run it: `ourvidz-worker run` (bench_claim.CliWorker), its handler writing each
        start to a file. (commits, starts) by seq."""
        log_file = self.home / f"pickup-{uuid.uuid4().hex[:8]}.log"
        log_file.touch()
        inserter = OursInserter(self.url)

        def starts() -> dict[int, float]:
            lines = [line.split() for line in log_file.read_text().splitlines()]
            return {int(seq): float(at) for seq, at in lines if seq != "None"}

        try:
            with bench_claim.CliWorker(self.url, self.home, handler_log=log_file) as worker:
                worker.wait_ready()
                inserter.insert(WARMUP_SEQ)
                deadline = time.monotonic() + 60
                while WARMUP_SEQ not in starts() and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(settle)
                commits: dict[int, float] = {}
                start = time.perf_counter()
                for seq in range(count):
                    delay = start + seq / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    inserter.insert(seq)
                    commits[seq] = time.time()
                deadline = time.monotonic() + 30
                while len(starts()) < 1 + count and time.monotonic() < deadline:
                    time.sleep(0.02)
            return commits, starts()
        finally:
            inserter.close()

    def pickup(self, system: System, count: int, rate: float, settle: float) -> dict[str, float]:
        self.clean()
        if system.name == OURS:
            commits, starts = self.pickup_cli(count, rate, settle)
            return pickup_figures(system.name, commits, starts, count)
        inserter = system.inserter(self.url)
        try:
            with self.start_idle_worker(system, inserter, settle) as child:
                commits: dict[int, float] = {}
                start = time.perf_counter()
                for seq in range(count):
                    delay = start + seq / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    inserter.insert(seq)
                    commits[seq] = time.time()
                with contextlib.suppress(TimeoutError):
                    child.wait_count(1 + count, 30)
                child.stop()
                starts: dict[int, float] = child.result(60)["starts"]
        finally:
            inserter.close()
        return pickup_figures(system.name, commits, starts, count)

    def idle(self, system: System, seconds: float, settle: float) -> tuple[float, list[tuple[int, str]]]:
        """Statements (or transactions, without pg_stat_statements) in `seconds`, and the top ones."""
        self.clean()
        inserter = system.inserter(self.url)
        try:
            child = self.start_idle_worker(system, inserter, 0)
        finally:
            inserter.close()
        with child, db.connect(self.url) as conn:
            time.sleep(settle)
            if self.database.has_pg_stat_statements:
                conn.execute("SELECT pg_stat_statements_reset()")
                time.sleep(seconds)
                rows = conn.execute(
                    "SELECT s.calls, regexp_replace(s.query, '\\s+', ' ', 'g') AS query"
                    " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                    " WHERE d.datname = current_database() AND s.query NOT ILIKE '%pg_stat_statements%'"
                    " ORDER BY s.calls DESC").fetchall()
                count = float(sum(row["calls"] for row in rows))
                top = [(int(row["calls"]), str(row["query"])) for row in rows]
            else:
                before = transactions(conn)
                time.sleep(seconds)
                count = float(transactions(conn) - before - 1)  # less the read of `before`
                top = []
            child.stop()
            child.result(60)
        return count, top


def pickup_figures(name: str, commits: dict[int, float], starts: dict[int, float], count: int) -> dict[str, float]:
    latencies = [(starts[seq] - t) * 1000 for seq, t in commits.items() if seq in starts]
    if not latencies:
        raise RuntimeError(f"{name}: no job was picked up")
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99), "missed": float(count - len(latencies))}


def transactions(conn: Conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT xact_commit + xact_rollback AS n FROM pg_stat_database"
                       " WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row["n"])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# ============================================================================================
# Results and the report
# ============================================================================================


@dataclass
class Results:
    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (system, metric) -> values
    idle_top: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average at each run's start

    def sample_load(self) -> None:
        self.load.append(os.getloadavg()[0])

    def add(self, system: str, metric: str, value: float) -> None:
        self.runs.setdefault((system, metric), []).append(value)

    def median(self, system: str, metric: str) -> float | None:
        values = self.runs.get((system, metric))
        return statistics.median(values) if values else None


def drain_metric(label: str) -> str:
    return f"drain {label} (jobs/s)"


def pickup_metric(p: str) -> str:
    return f"pickup {p} (ms)"


def idle_metric(seconds: float, statements: bool) -> str:
    return f"idle {'statements' if statements else 'xacts'}/{seconds:g}s"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def code_fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for folder in ("worker", "sql"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".sql"):
                digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def code_description() -> str:
    """Which worker code ran: the commit, uncommitted changes, and where it was imported from."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(SOURCE_REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "worker", "sql").splitlines()
    where = f"a copy taken at start, {REPO_ROOT}" if REPO_ROOT != SOURCE_REPO else "the live tree"
    return (f"HEAD {git('rev-parse', '--short', 'HEAD')}"
            + (f" + {len(dirty)} uncommitted changes in worker/ sql/" if dirty else "")
            + f"; imported from {where}; fingerprint {code_fingerprint(REPO_ROOT)}")


def machine_description() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"nproc {usable} ({os.cpu_count()} online), {model}, {platform.platform()}"


def server_description(url: str) -> str:
    with db.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        knobs = conn.execute(
            "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) AS s"
            " FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers',"
            " 'max_connections', 'shared_preload_libraries')").fetchone()
    return f"PostgreSQL {version['server_version'] if version else '?'} ({knobs['s'] if knobs else ''})"


def print_targets(results: Results, args: argparse.Namespace, peers: list[str], database: Database,
                  idle_key: str) -> None:
    """Drain: ours >= the best peer at each concurrency, measured here and in the reference figures."""
    print("\ntargets")
    for c in args.concurrency:
        metric = drain_metric(f"c={c}")
        ours = results.median(OURS, metric)
        measured = [(results.median(p, metric), f"{p} here") for p in peers]
        reference = [(r.get(f"drain c={c}"), f"{p} reference") for p, r in REFERENCE.items()]
        for best, source in (max(((v, n) for v, n in group if v is not None), default=(None, ""))
                             for group in (measured, reference)):
            if ours is not None and best is not None:
                verdict = "ok" if ours >= best else "MISS"
                print(f"  drain c={c:<3} ours {fmt(ours):>8} jobs/s  >= best peer {fmt(best):>8}"
                      f" ({source}): {verdict}")
    p99 = results.median(OURS, pickup_metric("p99"))
    if p99 is not None:
        verdict = "ok" if p99 <= TARGET_PICKUP_P99_MS else "MISS"
        print(f"  pickup p99    ours {fmt(p99):>8} ms      <= {TARGET_PICKUP_P99_MS:g} ms: {verdict}")
        best = min((v for p in peers if (v := results.median(p, pickup_metric("p99"))) is not None), default=None)
        if best is not None:
            verdict = "ok" if p99 <= best else "MISS"
            print(f"  pickup p99    ours {fmt(p99):>8} ms      <= best peer here {fmt(best):>8} ms: {verdict}")
    claims = [(m, results.median(OURS, m)) for (system, m) in results.runs
              if system == OURS and m.startswith("claim ") and m.endswith(" db (ms)")]
    if claims:
        worst_metric, worst = max(claims, key=lambda c: c[1] or 0.0)
        verdict = "ok" if worst is not None and worst < TARGET_CLAIM_DB_MS else "MISS"
        print(f"  claim         ours {fmt(worst):>8} ms db, the slowest case ({worst_metric[6:-8]}),"
              f" < {TARGET_CLAIM_DB_MS:g} ms: {verdict}")
    alone = next((results.median(OURS, m) for (system, m) in results.runs if system == OURS
                  and m.startswith("mixed drain") and m.endswith("alone (s)")), None)
    behind = next((results.median(OURS, m) for (system, m) in results.runs if system == OURS
                   and m.startswith("mixed drain") and " behind " in m), None)
    if alone and behind:
        verdict = "ok" if behind <= alone * 1.5 else "MISS"
        print(f"  mixed         ours {fmt(behind):>8} s behind the backlog <= 1.5 x {fmt(alone)} s alone: {verdict}")
    fair, fifo = (results.median(OURS, f"fairness {o} wait light p95 (s)") for o in ("fair", "FIFO"))
    if fair is not None and fifo is not None:
        verdict = "ok" if fair < fifo / 4 else "MISS"
        print(f"  fairness      light users' wait p95 {fmt(fair)} s fair < FIFO {fmt(fifo)} s / 4: {verdict}")
    idle = results.median(OURS, idle_key)
    if idle is not None:
        per30 = idle * 30 / args.idle_seconds
        verdict = "ok" if per30 <= TARGET_IDLE_PER_30S else "MISS"
        print(f"  idle          ours {fmt(per30):>8} per 30 s <= {TARGET_IDLE_PER_30S:g}: {verdict}"
              + ("" if database.has_pg_stat_statements else " (transactions, not statements)"))


def print_report(results: Results, args: argparse.Namespace, systems: list[System], database: Database,
                 idle_key: str) -> None:
    names = [s.name for s in systems]
    peers = names[1:]
    print("\n" + "=" * 100)
    print("command:  " + shlex.join([sys.executable, *sys.argv]))
    print(f"database: {database.kind}; {server_description(database.url)}")
    print(f"machine:  {machine_description()}; Python {platform.python_version()}")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("psycopg", "psycopg-pool", *peers))
    print(f"packages: {versions}")
    if "pgqueuer" in peers:
        print(f"pgqueuer: driver {args.pgqueuer_driver}, batch size 10 (default), c=N is entrypoint"
              " concurrency_limit=N, default is no limit")
    print(f"protocol: drain {args.jobs} jobs (cap {args.drain_cap:g}s); pickup {args.pickup_count} inserts"
          f" at {args.pickup_rate:g}/s; idle {args.idle_seconds:g}s after {args.settle:g}s settle;"
          f" median of {args.repeat} runs")
    if results.load:
        print(f"load:     1-minute load average at run starts: median {statistics.median(results.load):.2f},"
              f" max {max(results.load):.2f} (nproc {os.cpu_count()}; our worker and server alone make ~1-2;"
              " more means other processes shared the CPUs)")
    for note in results.notes:
        print(f"note:     {note}")

    width = max([30, *(len(metric) + 1 for _, metric in results.runs)])
    print(f"\n{'system':<15}{'metric':<{width}}{'median':>10}   runs")
    for name in names:
        for (system, metric), values in results.runs.items():
            if system == name:
                runs = ", ".join(fmt(v) for v in values)
                print(f"{name:<15}{metric:<{width}}{fmt(results.median(name, metric)):>10}   {runs}")

    if peers:
        print("\nratios ours/peer (drain: higher is better; pickup and idle: lower is better)")
        print(f"{'metric':<30}" + "".join(f"{p:>16}" for p in peers))
        ours_metrics = [m for (s, m) in results.runs if s == OURS and m.split()[0] in ("drain", "pickup", "idle")]
        for metric in ours_metrics:
            cells = []
            for peer in peers:
                ours, theirs = results.median(OURS, metric), results.median(peer, metric)
                cells.append(f"{ours / theirs:.2f}x" if ours is not None and theirs else "-")
            print(f"{metric:<30}" + "".join(f"{c:>16}" for c in cells))
        default = results.median("pgqueuer", drain_metric("default"))
        top = max(args.concurrency)
        ours_top = results.median(OURS, drain_metric(f"c={top}"))
        if default and ours_top:
            print(f"{'ours c=' + str(top) + ' / pgqueuer default':<30}{ours_top / default:>15.2f}x")

    print_targets(results, args, peers, database, idle_key)

    if results.idle_top:
        print("\nidle: statements of the last run, most frequent first")
        for name, top in results.idle_top.items():
            for calls, query in top[:8]:
                print(f"  {name:<15}{calls:>5}  {query[:120]}")

    print("\nreference (brief; 2 vCPU, Postgres 15 local, medians of 3):")
    for peer, figures in REFERENCE.items():
        print(f"  {peer:<15}" + ", ".join(f"{k} {v:g}" for k, v in figures.items()))


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="default: $DATABASE_URL, else a throwaway server")
    parser.add_argument("--tcp", action="store_true", help="throwaway server: connect over TCP, not a socket")
    parser.add_argument("--pg-option", action="append", default=[], metavar="NAME=VALUE",
                        help="throwaway server setting, e.g. synchronous_commit=off (repeatable)")
    parser.add_argument("--compare", default="", help="peers to run too: pgqueuer,procrastinate")
    parser.add_argument("--only", default="drain,pickup,idle",
                        help=f"phases to run, of {','.join(PHASES)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--concurrency", default="1,4,16", help="drain concurrency limits")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per drain")
    parser.add_argument("--pickup-count", type=int, default=500, help="single-row inserts per pickup run")
    parser.add_argument("--pickup-rate", type=float, default=50.0, help="pickup inserts per second")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle measurement window")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds an idle worker settles first")
    parser.add_argument("--claim-sizes", default="0,100000,1000000", help="claim: due jobs in the table")
    parser.add_argument("--claim-history", type=int, default=500_000,
                        help="claim: finished jobs in the table whose statistics go stale")
    parser.add_argument("--claim-count", type=int, default=200, help="claim: one-job claims per run")
    parser.add_argument("--mixed-backlog", type=int, default=100_000, help="mixed: due jobs of the unserved type")
    parser.add_argument("--mixed-jobs", type=int, default=2_000, help="mixed: jobs of the served type")
    parser.add_argument("--drain-cap", type=float, default=300.0, help="seconds after which a drain is "
                        "stopped and rated on the jobs done by then (marked partial)")
    parser.add_argument("--pgqueuer-driver", choices=("asyncpg", "psycopg"), default="asyncpg",
                        help="PGQueuer's driver (its psycopg driver stalls in drain mode here)")
    parser.add_argument("--live-code", action="store_true",
                        help="import worker/ from the tree as it is at each run, not a copy taken at start")
    parser.add_argument("--force", action="store_true", help="with a given URL: truncate public.jobs even "
                        "when it holds jobs that are not the benchmark's")
    args = parser.parse_args(argv)
    args.compare = [p.strip() for p in args.compare.split(",") if p.strip()]
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.claim_sizes = [int(n) for n in args.claim_sizes.split(",") if n.strip()]
    for peer in args.compare:
        if peer not in PEERS:
            parser.error(f"--compare: unknown peer {peer!r} (known: {', '.join(PEERS)})")
    for phase in args.only:
        if phase not in PHASES:
            parser.error(f"--only: unknown phase {phase!r}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def refuse_foreign_jobs(url: str) -> None:
    """A given database may be someone's: do not truncate jobs that are not ours to drop."""
    with db.connect(url) as conn:
        row = conn.execute("SELECT to_regclass('public.jobs') IS NOT NULL AS yes").fetchone()
        if not (row and row["yes"]):
            return
        row = conn.execute("SELECT count(*) AS n FROM public.jobs WHERE job_type <> %s",
                           (BENCH_TYPE,)).fetchone()
    if row and row["n"]:
        sys.exit(f"public.jobs holds {row['n']} jobs that are not {BENCH_TYPE}; the benchmark truncates it."
                 " Use a scratch database, or --force.")


@contextlib.contextmanager
def database_for(args: argparse.Namespace) -> Iterator[Database]:
    database = open_database(args.database_url, args.tcp, args.pg_option)
    try:
        yield database
    finally:
        database.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)  # "App in the main module"
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the server too
    systems = make_systems(args.compare)
    results = Results()
    code = code_description()
    with database_for(args) as database, tempfile.TemporaryDirectory(prefix="bench-home-") as home:
        print(f"database: {database.kind}")
        if args.database_url and not args.force:
            refuse_foreign_jobs(database.url)
        for system in systems:
            system.install(database.url)
        database.has_pg_stat_statements = enable_pg_stat_statements(database.url)
        if not database.has_pg_stat_statements:
            results.notes.append("no pg_stat_statements: idle counts transactions (pg_stat_database)")
        bench = Bench(database, systems, Path(home), args.drain_cap, args.pgqueuer_driver)
        idle_key = idle_metric(args.idle_seconds, database.has_pg_stat_statements)

        if "drain" in args.only:
            for run in range(1, args.repeat + 1):
                for system in systems:
                    for variant in system.drain_variants(args.concurrency):
                        results.sample_load()
                        rate, done = bench.drain(system, variant, args.jobs)
                        results.add(system.name, drain_metric(variant.label), rate)
                        partial = f", PARTIAL: {done} of {args.jobs} done" if done < args.jobs else ""
                        if partial:
                            results.notes.append(f"{system.name} drain {variant.label} run {run}{partial}")
                        print(f"[drain  {run}/{args.repeat}] {system.name:<14} {variant.label:<8} "
                              f"{rate:9,.0f} jobs/s ({done / rate:.1f} s{partial})", flush=True)

        if "pickup" in args.only:
            for run in range(1, args.repeat + 1):
                for system in systems:
                    results.sample_load()
                    got = bench.pickup(system, args.pickup_count, args.pickup_rate, settle=1.0)
                    for p in ("p50", "p95", "p99"):
                        results.add(system.name, pickup_metric(p), got[p])
                    if got["missed"]:
                        missed = f"{got['missed']:.0f}"
                        results.notes.append(f"{system.name} pickup run {run}: {missed} jobs not seen")
                    print(f"[pickup {run}/{args.repeat}] {system.name:<14} {system.serve_variant().label:<8} "
                          f"p50 {got['p50']:.2f} ms, p95 {got['p95']:.2f} ms, p99 {got['p99']:.2f} ms",
                          flush=True)

        if "idle" in args.only:
            for run in range(1, args.repeat + 1):
                for system in systems:
                    results.sample_load()
                    count, top = bench.idle(system, args.idle_seconds, args.settle)
                    results.add(system.name, idle_key, count)
                    results.idle_top[system.name] = top
                    print(f"[idle   {run}/{args.repeat}] {system.name:<14} {system.serve_variant().label:<8} "
                          f"{count:.0f} {idle_key.split()[1]}", flush=True)

        scenario_figures: list[tuple[str, dict[str, list[float]]]] = []
        home_dir = Path(home)
        if "claim" in args.only:
            scenario_figures.append(("claim", bench_claim.claim_latency(
                database.url, args.claim_sizes, args.claim_history, args.claim_count, args.repeat)))
        if "mixed" in args.only:
            scenario_figures.append(("mixed", bench_claim.mixed_fleet(
                database.url, home_dir, args.mixed_backlog, args.mixed_jobs, args.idle_seconds, args.repeat)))
        if "fairness" in args.only:
            scenario_figures.append(("fairness", bench_claim.fairness(database.url, home_dir, args.repeat)))
        for phase, figures in scenario_figures:
            for metric, values in figures.items():
                for value in values:
                    results.add(OURS, f"{phase} {metric}", value)

        results.notes.append(f"worker code: {code}")
        if REPO_ROOT == SOURCE_REPO and code_description() != code:
            results.notes.append("worker code CHANGED during the run: runs may mix versions")
        print_report(results, args, systems, database, idle_key)


if __name__ == "__main__":
    main()
