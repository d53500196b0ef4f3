"""The claim scenarios of scripts/bench_queue.py (--only claim,mixed,fairness), and the worker it runs
as users do: `ourvidz-worker run` in its own process, with this module's handler.

  claim     claim latency with 0 / 100k / 1M due jobs: a fresh table (never analyzed), one with a long
            history analyzed before the burst (stale statistics), and the same after ANALYZE. One
            worker-like client claims one job at a time (prepared statements, async commit, as the
            worker's pool); figures: database time per claim (pg_stat_statements), and the client's
            round trip.
  mixed     2,000 jobs of the type a worker serves behind 100k due jobs of a type nobody serves: the
            drain time with and without that backlog, then the database time an idle `--no-listen`
            worker costs per 30 s with the backlog still there.
  fairness  an idle worker (concurrency 4); one user inserts 500 jobs at once, then 10 users 5 each;
            each job sleeps 10 ms: the light users' wait (claim - insert), fair (turns) against FIFO
            (the insert trigger that sets turns off: every job on turn 0, only the due time orders).

Each scenario works in databases of its own on the benchmark's server (it needs CREATE DATABASE) and
drops them at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from worker import db
from worker.handlers.base import JobContext
from worker.jobs import Job
from worker.queue import JobQueue

SCRIPTS = Path(__file__).resolve().parent
SNAPSHOT_ENV = "BENCH_QUEUE_CODE"  # scripts/bench_queue.py: the copy of worker/ every process imports
HANDLER_LOG_ENV = "BENCH_HANDLER_LOG"
BENCH_TYPE, BENCH_QUEUE = "bench_noop", "bench"
BACKLOG_TYPE, BACKLOG_QUEUE = "bench_backlog", "bench_backlog"  # served by no worker of the benchmark

Conn = db.Connection


class BenchHandler:
    """`--handler noop=bench_claim:BenchHandler`: sleeps payload["sleep"] seconds; with
    $BENCH_HANDLER_LOG set, appends "<payload seq> <start, time.time()>" to that file first."""

    concurrent = True
    uses_storage = False

    def __init__(self) -> None:
        path = os.environ.get(HANDLER_LOG_ENV)
        self._log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - open for the process
        self._lock = threading.Lock()

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        started = time.time()
        if self._log is not None:
            with self._lock:
                self._log.write(f"{job.payload.get('seq')} {started!r}\n")
        if pause := float(job.payload.get("sleep", 0)):
            time.sleep(pause)
        return {}


def worker_command() -> list[str]:
    script = Path(sys.executable).with_name("ourvidz-worker")
    if script.exists():
        return [str(script)]
    found = shutil.which("ourvidz-worker")
    if found is None:
        sys.exit("ourvidz-worker is not installed: pip install -e . (the benchmark runs it as users do)")
    return [found]


class CliWorker:
    """`ourvidz-worker run --queues bench --handler noop=bench_claim:BenchHandler` in its own process,
    importing worker/ from the benchmark's copy. Stopped with SIGTERM, as a deployment stops it."""

    def __init__(self, url: str, home: Path, *, concurrency: int = 1, listen: bool = True,
                 handler_log: Path | None = None) -> None:
        self.url = url
        self.id = f"bench-cli-{uuid.uuid4().hex[:8]}"
        paths = [p for p in (os.environ.get(SNAPSHOT_ENV), str(SCRIPTS), os.environ.get("PYTHONPATH")) if p]
        env = {**os.environ, "DATABASE_URL": url, "OURVIDZ_HOME": str(home), "PYTHONPATH": os.pathsep.join(paths)}
        if handler_log is not None:
            env[HANDLER_LOG_ENV] = str(handler_log)
        command = [*worker_command(), "run", "--queues", BENCH_QUEUE, "--concurrency", str(concurrency),
                   "--handler", "noop=bench_claim:BenchHandler", "--worker-id", self.id,
                   *([] if listen else ["--no-listen"])]
        self.output = home / f"{self.id}.log"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> CliWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120) -> None:
        """Registered in `workers` (imports, preflight and LISTEN take a few seconds)."""
        deadline = time.monotonic() + timeout
        with db.connect(self.url) as conn:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"ourvidz-worker exited {self.process.returncode}: {self.tail()}")
                row = conn.execute("SELECT state FROM public.workers WHERE id = %s", (self.id,)).fetchone()
                if row and row["state"] in ("idle", "busy"):
                    time.sleep(0.5)  # the start-up claim and LISTEN
                    return
                time.sleep(0.05)
        raise TimeoutError(f"ourvidz-worker did not register within {timeout:.0f}s: {self.tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.output.read_text(errors="replace")[-2000:]
        return ""


# --------------------------------------------------------------------------------------------
# Databases of a scenario's own, and rows in bulk
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(url: str, name: str) -> Iterator[str]:
    admin = make_conninfo(url, dbname="postgres")
    with db.connect(admin) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    scratch = make_conninfo(url, dbname=name)
    try:
        db.migrate(scratch)
        with db.connect(scratch) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("ALTER TABLE public.jobs SET (autovacuum_enabled = false)")  # the statistics stay as set
            conn.execute("INSERT INTO public.job_types (name, queue, handler) VALUES (%s, %s, 'noop'),"
                         " (%s, %s, 'none')", (BENCH_TYPE, BENCH_QUEUE, BACKLOG_TYPE, BACKLOG_QUEUE))
        yield scratch
    finally:
        with db.connect(admin) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def add_users(conn: Conn, n: int) -> list[Any]:
    rows = conn.execute("INSERT INTO auth.users (email) SELECT 'bench-' || gen_random_uuid() || '@example.com'"
                        " FROM generate_series(1, %s) RETURNING id", (n,)).fetchall()
    return [r["id"] for r in rows]


def bulk_queued(conn: Conn, job_type: str, queue: str, n: int, users: int = 100) -> None:
    """n due jobs spread over `users` users, turns as the insert trigger gives them, in one statement
    with the triggers off: a million rows in seconds."""
    ids = add_users(conn, users) if users else []
    conn.execute("SET session_replication_role = replica")
    try:
        conn.execute(
            "INSERT INTO public.jobs (job_type, queue, max_attempts, payload, user_id, turn, run_at, created_at)"
            " SELECT %(t)s, %(q)s, 3, '{}', (%(users)s::uuid[])[g %% greatest(%(k)s, 1) + 1],"
            " g / greatest(%(k)s, 1), now() - interval '1 hour', now() - interval '1 hour'"
            " FROM generate_series(0, %(n)s - 1) AS g",
            {"t": job_type, "q": queue, "users": ids, "k": len(ids), "n": n})
    finally:
        conn.execute("SET session_replication_role = origin")


def bulk_history(conn: Conn, n: int) -> None:
    conn.execute("SET session_replication_role = replica")
    try:
        conn.execute("INSERT INTO public.jobs (job_type, queue, max_attempts, payload, status, result, attempts,"
                     " worker_id, created_at, run_at, started_at, finished_at)"
                     " SELECT %s, %s, 3, '{}', 'completed', '{}', 1, 'old', now() - interval '2 days',"
                     " now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'"
                     " FROM generate_series(1, %s)", (BENCH_TYPE, BENCH_QUEUE, n))
    finally:
        conn.execute("SET session_replication_role = origin")


def statement_ms(conn: Conn, like: str) -> tuple[float, int]:
    """(total database ms, calls) of the statements matching `like` since the last reset."""
    row = conn.execute("SELECT coalesce(sum(total_exec_time), 0) AS ms, coalesce(sum(calls), 0) AS calls"
                       " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                       " WHERE d.datname = current_database() AND s.query ILIKE %s", (like,)).fetchone()
    assert row is not None
    return float(row["ms"]), int(row["calls"])


# --------------------------------------------------------------------------------------------
# claim: latency at any backlog and with any statistics
# --------------------------------------------------------------------------------------------


def measure_claims(url: str, claims: int) -> tuple[float, float, float]:
    """(database ms per claim, client round trip ms median, p99) over `claims` one-job claims made the
    way the worker makes them."""
    pool = db.make_pool(url, 1, name="bench-claimer", check=False, async_commit=True)
    try:
        queue = JobQueue(pool, f"bench-claimer-{uuid.uuid4().hex[:6]}", async_commit=True)
        for _ in range(5):  # the session plans the function once; psycopg prepares after five calls
            queue.claim([BENCH_TYPE], 1)
        with db.connect(url) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        rounds = []
        for _ in range(claims):
            t0 = time.perf_counter()
            queue.claim([BENCH_TYPE], 1)
            rounds.append((time.perf_counter() - t0) * 1000)
        with db.connect(url) as conn:
            total, calls = statement_ms(conn, "%claim_jobs(%")
    finally:
        pool.close()
    rounds.sort()
    return total / max(calls, 1), statistics.median(rounds), rounds[min(len(rounds) - 1, int(len(rounds) * 0.99))]


def claim_latency(url: str, sizes: list[int], history: int, claims: int, repeat: int) -> dict[str, list[float]]:
    """{"<size> <state> db (ms)": [database ms per claim, one per run]}, and the client's round trips."""
    figures: dict[str, list[float]] = {}

    def record(label: str) -> None:
        for _ in range(repeat):
            db_ms, median, p99 = measure_claims(scratch, claims)
            figures.setdefault(f"{label} db (ms)", []).append(db_ms)
            figures.setdefault(f"{label} client (ms)", []).append(median)
            figures.setdefault(f"{label} client p99 (ms)", []).append(p99)
        print(f"[claim] {label:<14} db {statistics.median(figures[f'{label} db (ms)']):.3f} ms per claim,"
              f" client round trip {statistics.median(figures[f'{label} client (ms)']):.3f} ms", flush=True)

    for size in sizes:
        name = f"{size // 1000}k" if size else "0"
        with scratch_database(url, "bench_claim_fresh") as scratch:
            with db.connect(scratch) as conn:
                bulk_queued(conn, BENCH_TYPE, BENCH_QUEUE, size)
            record(f"{name} fresh")
        with scratch_database(url, "bench_claim_stale") as scratch:
            with db.connect(scratch) as conn:
                bulk_history(conn, history)
                conn.execute("ANALYZE public.jobs")  # the statistics of a table of finished jobs
                bulk_queued(conn, BENCH_TYPE, BENCH_QUEUE, size)  # then a burst they know nothing of
            record(f"{name} stale")
            with db.connect(scratch) as conn:
                conn.execute("ANALYZE public.jobs")
            record(f"{name} analyzed")
    return figures


# --------------------------------------------------------------------------------------------
# mixed: a worker of type B behind a backlog of type A
# --------------------------------------------------------------------------------------------


def drain_seconds(url: str, home: Path, jobs: int, *, timeout: float = 300) -> float:
    """Seconds from the first start to the last finish of the `jobs` queued bench jobs (database clock)."""
    with CliWorker(url, home) as worker, db.connect(url) as conn:
        worker.wait_ready()
        deadline = time.monotonic() + timeout
        while True:
            row = conn.execute("SELECT count(*) AS n, extract(epoch FROM max(finished_at) - min(started_at)) AS s"
                               " FROM public.jobs WHERE job_type = %s AND status = 'completed'",
                               (BENCH_TYPE,)).fetchone()
            assert row is not None
            if row["n"] >= jobs:
                return float(row["s"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row['n']} of {jobs} jobs done after {timeout:.0f}s")
            time.sleep(0.1)


def idle_db_ms(url: str, home: Path, seconds: float, settle: float = 3.0) -> float:
    """Database milliseconds an idle `--no-listen` worker costs in `seconds`."""
    with CliWorker(url, home, listen=False) as worker, db.connect(url) as conn:
        worker.wait_ready()
        time.sleep(settle)
        conn.execute("SELECT pg_stat_statements_reset()")
        time.sleep(seconds)
        total, _ = statement_ms(conn, "%")
        reset, _ = statement_ms(conn, "%pg_stat_statements_reset%")
    return total - reset


def mixed_fleet(url: str, home: Path, backlog: int, jobs: int, idle_seconds: float,
                repeat: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for run in range(1, repeat + 1):
        for behind in (0, backlog):
            label = f"{jobs} B behind {behind // 1000}k A" if behind else f"{jobs} B alone"
            with scratch_database(url, "bench_mixed") as scratch:
                with db.connect(scratch) as conn:
                    bulk_queued(conn, BACKLOG_TYPE, BACKLOG_QUEUE, behind)
                    bulk_queued(conn, BENCH_TYPE, BENCH_QUEUE, jobs)
                    conn.execute("VACUUM ANALYZE public.jobs")
                seconds = drain_seconds(scratch, home, jobs)
                figures.setdefault(f"drain {label} (s)", []).append(seconds)
                line = f"[mixed  {run}/{repeat}] drain {label}: {seconds:.2f} s"
                if behind:
                    idle = idle_db_ms(scratch, home, idle_seconds) * 30 / idle_seconds
                    figures.setdefault(f"idle worker's db time per 30 s, {behind // 1000}k A queued (ms)",
                                       []).append(idle)
                    line += f"; idle --no-listen worker {idle:.1f} ms of database time per 30 s"
                print(line, flush=True)
    return figures


# --------------------------------------------------------------------------------------------
# fairness: one heavy user and ten light ones, fair against FIFO
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def completed(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) AS n FROM public.jobs WHERE status = 'completed'").fetchone()
    return int(row["n"]) if row else 0


def fairness_run(url: str, home: Path, fifo: bool, heavy_jobs: int, light_users: int, light_jobs: int,
                 sleep: float, concurrency: int) -> dict[str, float]:
    """An idle worker; one user inserts `heavy_jobs` in one statement, then each light user theirs.
    FIFO: the insert trigger that sets turns is off, every job is on turn 0."""
    with scratch_database(url, "bench_fair") as scratch:
        with db.connect(scratch) as conn:
            heavy, *light = add_users(conn, 1 + light_users)
            if fifo:
                conn.execute("ALTER TABLE public.jobs DISABLE TRIGGER jobs_before_insert_turn")
        total = heavy_jobs + light_users * light_jobs
        pool = db.make_pool(scratch, 1, name="bench-fair")
        try:
            with CliWorker(scratch, home, concurrency=concurrency) as worker, db.connect(scratch) as conn:
                worker.wait_ready()
                queue = JobQueue(pool)
                queue.enqueue_many(BENCH_TYPE, [{"sleep": sleep}] * heavy_jobs, user_id=heavy)
                for user in light:
                    queue.enqueue_many(BENCH_TYPE, [{"sleep": sleep}] * light_jobs, user_id=user)
                deadline = time.monotonic() + 300
                while completed(conn) < total:
                    if time.monotonic() > deadline:
                        raise TimeoutError("fairness: the jobs did not finish within 300 s")
                    time.sleep(0.1)
                rows = conn.execute("SELECT user_id = %s AS heavy, extract(epoch FROM started_at - created_at) AS wait"
                                    " FROM public.jobs", (heavy,)).fetchall()
        finally:
            pool.close()
    light_waits = [float(r["wait"]) for r in rows if not r["heavy"]]
    heavy_waits = [float(r["wait"]) for r in rows if r["heavy"]]
    return {"light p50": percentile(light_waits, 50), "light p95": percentile(light_waits, 95),
            "heavy p50": percentile(heavy_waits, 50)}


def fairness(url: str, home: Path, repeat: int, heavy_jobs: int = 500, light_users: int = 10, light_jobs: int = 5,
             sleep: float = 0.01, concurrency: int = 4) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for run in range(1, repeat + 1):
        for fifo in (False, True):
            got = fairness_run(url, home, fifo, heavy_jobs, light_users, light_jobs, sleep, concurrency)
            order = "FIFO" if fifo else "fair"
            for key, value in got.items():
                figures.setdefault(f"{order} wait {key} (s)", []).append(value)
            print(f"[fair   {run}/{repeat}] {order}: light users' wait p50 {got['light p50']:.3f} s,"
                  f" p95 {got['light p95']:.3f} s; heavy user's p50 {got['heavy p50']:.3f} s", flush=True)
    return figures
