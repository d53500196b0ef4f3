"""HTTP health, status and metrics of one running worker (`ourvidz-worker run --health-port N`).

- `GET /health`: 200 `{"status": "healthy", ...}` while the main loop iterates, the database
  answers and the lease keeper beats; 503 with the failing checks otherwise. For liveness and
  readiness probes; the database check is cached for about a second so probes cannot hammer it.
- `GET /status`: what the worker is doing (the fields of the seeds' `/status` and
  `/memory/status`): id, queues, state, current jobs with progress and stage, loaded models,
  memory, job counts, uptime, version.
- `GET /metrics`: Prometheus text format, from a registry of this worker's own.

The server only reads the worker's state; it never claims, writes rows or touches models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from worker.loop import VERSION, Running, Worker

log = logging.getLogger(__name__)

ARCHITECTURE = "pure_inference_engine"  # seed 001: prompts run as given, never rewritten by the worker
STATES = ("starting", "idle", "busy", "draining", "stopped")
PRESSURE_LEVELS = ("low", "medium", "high", "critical")
RUN_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)
WAIT_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, math.inf)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class DatabaseProbe:
    """`SELECT 1` through the worker's own pool, answered within `timeout` and cached for `ttl`.

    The probe runs in a thread of its own so that a hung server (or network) costs a probe
    `timeout` seconds, not forever; while one probe hangs no second one is started.
    """

    def __init__(self, pool: ConnectionPool[Any], timeout: float = 2.0, ttl: float = 1.0) -> None:
        self.pool = pool
        self.timeout = timeout
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: Check | None = None
        self._cached_at = -math.inf
        self._thread: threading.Thread | None = None
        self._answer: Check | None = None

    def check(self) -> Check:
        with self._lock:  # concurrent probes wait for the one in flight and share its answer
            if self._cached is not None and time.monotonic() - self._cached_at < self.ttl:
                return self._cached
            if self._thread is None or not self._thread.is_alive():
                self._answer = None
                self._thread = threading.Thread(target=self._probe, name="health-db-probe", daemon=True)
                self._thread.start()
            self._thread.join(self.timeout)
            answer = self._answer
            if answer is None:
                answer = Check(False, f"no answer within {self.timeout:g}s")
            self._cached, self._cached_at = answer, time.monotonic()
            return answer

    def _probe(self) -> None:
        started = time.monotonic()
        try:
            with self.pool.connection(timeout=self.timeout) as conn:
                conn.execute("SELECT 1")
        except Exception as err:
            self._answer = Check(False, f"{type(err).__name__}: {err}".strip())
            return
        self._answer = Check(True, f"answered in {(time.monotonic() - started) * 1000:.0f} ms")


# --- reading the worker --------------------------------------------------------------------


def worker_state(worker: Worker) -> str:
    """starting | idle | busy | draining | stopped, as this process sees it (the workers row lags a beat)."""
    if worker._done.is_set():
        return "stopped"
    if worker.last_loop_at is None:
        return "starting"
    if worker._stop.is_set():
        return "draining"
    return "busy" if worker._running else "idle"


def _running(worker: Worker) -> list[Running]:
    with worker._running_lock:
        return list(worker._running.values())


def current_jobs(worker: Worker) -> list[dict[str, Any]]:
    now = time.monotonic()
    jobs = []
    for entry in _running(worker):
        progress, stage = entry.ctx.last_progress
        job = entry.job
        jobs.append({
            "job_id": str(job.id),
            "job_type": job.job_type,
            "queue": job.queue,
            "progress": progress,
            "stage": stage,
            "attempt": job.attempts,
            "max_attempts": job.max_attempts,
            "priority": job.priority,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "running_seconds": round(now - entry.started, 3),
            "cancel_pending": entry.ctx.cancelled,
        })
    return jobs


def loaded_models(worker: Worker) -> list[str]:
    """Handlers whose model is resident (the worker's memory manager)."""
    return worker.memory.loaded_names()


def memory_snapshot(worker: Worker) -> dict[str, Any]:
    """The memory manager's status (device, resident models, used/total/budget bytes, pressure, loads and
    evictions; vram_* None off a GPU) and the process's resident memory."""
    try:
        status = worker.memory.status()
    except Exception as err:  # a status page must not fail because of one device query
        log.warning("memory status failed: %s", err)
        status = {"device": None, "models": [], "pressure": None, "error": f"{type(err).__name__}: {err}"}
    return {**status, "ram_rss_bytes": _rss_bytes()}


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --- metrics -------------------------------------------------------------------------------


class WorkerMetrics:
    """A registry of one worker: counters and histograms fed as jobs finish, gauges read at scrape."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=False)
        self.jobs_finished = Counter(
            "ourvidz_jobs_finished", "Job attempts this worker ended, by job type and outcome "
            "(completed, failed, canceled, retried, lost).",
            ["job_type", "outcome"], registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ourvidz_job_queue_wait_seconds", "From a job becoming due (run_at) to this worker claiming it.",
            ["job_type"], buckets=WAIT_SECONDS_BUCKETS, registry=self.registry,
        )
        self.run_time = Histogram(
            "ourvidz_job_run_seconds", "From claim to outcome of one attempt, by job type and outcome.",
            ["job_type", "outcome"], buckets=RUN_SECONDS_BUCKETS, registry=self.registry,
        )
        self.registry.register(_WorkerCollector(worker))
        self._chained = worker.on_finish
        worker.on_finish = self.observe

    def observe(self, entry: Running, outcome: str) -> None:
        try:
            job = entry.job
            self.jobs_finished.labels(job.job_type, outcome).inc()
            self.run_time.labels(job.job_type, outcome).observe(max(0.0, time.monotonic() - entry.started))
            if job.started_at is not None:
                self.queue_wait.labels(job.job_type).observe(max(0.0, (job.started_at - job.run_at).total_seconds()))
        except Exception:  # called from the worker's main loop, which metrics must never stop
            log.exception("metrics: observing job %s failed", entry.job.id)
        if self._chained is not None:
            self._chained(entry, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def describe(self) -> list[Metric]:
        return []  # values come from the live worker at scrape time

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        now = time.monotonic()
        info = InfoMetricFamily("ourvidz_worker", "The worker's identity.")
        info.add_metric([], {"worker_id": w.id, "version": VERSION, "architecture": ARCHITECTURE,
                             "host": socket.gethostname()})
        yield info
        state = worker_state(w)
        states = GaugeMetricFamily("ourvidz_worker_state", "1 for the state the worker is in.", labels=["state"])
        for name in STATES:
            states.add_metric([name], 1.0 if name == state else 0.0)
        yield states
        yield GaugeMetricFamily("ourvidz_worker_uptime_seconds", "Seconds since the worker started.",
                                value=max(0.0, time.time() - w.started_at))
        yield CounterMetricFamily("ourvidz_jobs_claimed", "Job attempts this worker claimed.", value=w.stats.claimed)
        yield CounterMetricFamily("ourvidz_jobs_released", "Running jobs given back to the queue at shutdown.",
                                  value=w.stats.released)
        running = GaugeMetricFamily("ourvidz_jobs_running", "Jobs running now, by job type.", labels=["job_type"])
        counts = dict.fromkeys(w._served, 0)
        for entry in _running(w):
            counts[entry.job.job_type] = counts.get(entry.job.job_type, 0) + 1
        for job_type, count in sorted(counts.items()):
            running.add_metric([job_type], count)
        yield running
        yield GaugeMetricFamily("ourvidz_worker_concurrency", "Jobs the worker runs at once at most.",
                                value=w.settings.concurrency)
        yield GaugeMetricFamily("ourvidz_worker_listening", "1 while LISTEN/NOTIFY works, 0 while polling.",
                                value=1.0 if w._listening.is_set() else 0.0)
        if w.last_beat_at is not None:
            yield GaugeMetricFamily("ourvidz_worker_heartbeat_age_seconds",
                                    "Seconds since the last successful heartbeat (leases, workers row).",
                                    value=now - w.last_beat_at)
        if w.last_loop_at is not None:
            yield GaugeMetricFamily("ourvidz_worker_loop_age_seconds",
                                    "Seconds since the main loop's last iteration.", value=now - w.last_loop_at)
        yield GaugeMetricFamily("ourvidz_models_loaded", "Models resident in this worker.",
                                value=len(loaded_models(w)))
        memory = memory_snapshot(w)
        for key, name, text in (
            ("vram_used_bytes", "ourvidz_vram_used_bytes", "Device memory in use."),
            ("vram_total_bytes", "ourvidz_vram_total_bytes", "Device memory in all."),
            ("used_bytes", "ourvidz_memory_used_bytes", "Memory counted against the model budget."),
            ("budget_bytes", "ourvidz_memory_budget_bytes", "Memory the loaded models may fill."),
            ("ram_rss_bytes", "ourvidz_process_resident_bytes", "Resident memory of the worker process."),
        ):
            if memory.get(key) is not None:
                yield GaugeMetricFamily(name, text, value=memory[key])
        for key, name, text in (
            ("loads", "ourvidz_model_loads", "Model loads by the memory manager."),
            ("evictions", "ourvidz_model_evictions", "Models evicted to make room or after out of memory."),
            ("oom_relieved", "ourvidz_oom_relieved", "Out-of-memory errors relieved by evicting idle models."),
        ):
            if isinstance(memory.get(key), int):
                yield CounterMetricFamily(name, text, value=memory[key])
        if memory.get("pressure") in PRESSURE_LEVELS:
            pressure = GaugeMetricFamily("ourvidz_memory_pressure", "1 for the current memory pressure level.",
                                         labels=["level"])
            for level in PRESSURE_LEVELS:
                pressure.add_metric([level], 1.0 if level == memory["pressure"] else 0.0)
            yield pressure


# --- the server ------------------------------------------------------------------------------


class HealthServer:
    """Serves /health, /status and /metrics for one worker from a daemon thread.

    `loop_grace`: seconds beyond its longest legitimate sleep (the poll interval) after which a
    main loop that has not iterated counts as stuck.
    """

    def __init__(self, worker: Worker, host: str = "127.0.0.1", port: int = 0, *, db_timeout: float = 2.0,
                 db_cache_seconds: float = 1.0, loop_grace: float = 60.0) -> None:
        self.worker = worker
        self.loop_grace = loop_grace
        self.database = DatabaseProbe(worker.pool, timeout=db_timeout, ttl=db_cache_seconds)
        self.metrics = WorkerMetrics(worker)
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health server on port %d: /health /status /metrics", self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- documents ------------------------------------------------------------------------------

    def checks(self) -> dict[str, Check]:
        return {"loop": self._loop_check(), "database": self.database.check(), "lease_keeper": self._beat_check()}

    def health(self) -> tuple[int, dict[str, Any]]:
        checks = self.checks()
        failing = [name for name, check in checks.items() if not check.ok]
        w = self.worker
        body = {
            "status": "unhealthy" if failing else "healthy",
            "worker_id": w.id,
            "state": worker_state(w),
            "architecture": ARCHITECTURE,
            "version": VERSION,
            "active_jobs": len(_running(w)),
            "model_loaded": bool(loaded_models(w)),
            "uptime": round(time.time() - w.started_at, 3),
            "checks": {name: check.to_json() for name, check in checks.items()},
            "failing": failing,
        }
        return (503 if failing else 200), body

    def status(self) -> dict[str, Any]:
        w = self.worker
        stats = w.stats
        ended = stats.completed + stats.failed
        uptime = time.time() - w.started_at
        loaded = loaded_models(w)
        served = dict(w._served)
        return {
            "worker_id": w.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": VERSION,
            "architecture": ARCHITECTURE,
            "state": worker_state(w),
            "queues": list(w.settings.queues) or sorted({t.queue for t in served.values()}),
            "all_queues": not w.settings.queues,
            "job_types": sorted(served),
            "concurrency": w.settings.concurrency,
            "listening": w._listening.is_set(),
            "current_jobs": current_jobs(w),
            "loaded_models": loaded,
            "models": {name: "loaded" if name in loaded else "unloaded" for name in sorted(w.handlers)},
            "memory": memory_snapshot(w),
            "performance": {
                "jobs_claimed": stats.claimed,
                "jobs_completed": stats.completed,
                "jobs_failed": stats.failed,
                "jobs_retried": stats.retried,
                "jobs_canceled": stats.canceled,
                "jobs_lost": stats.lost,
                "jobs_released": stats.released,
                "success_rate": round(100.0 * stats.completed / ended, 1) if ended else None,
            },
            "started_at": datetime.fromtimestamp(w.started_at, UTC).isoformat(),
            "uptime": round(uptime, 3),
            "heartbeat_age": _age(w.last_beat_at),
            "loop_age": _age(w.last_loop_at),
        }

    def _loop_check(self) -> Check:
        w = self.worker
        if w._done.is_set():
            return Check(False, "stopped")
        if w.last_loop_at is None:
            return Check(False, "not started")
        age = time.monotonic() - w.last_loop_at
        settings = w.settings
        if w._stop.is_set():  # the loop has left for shutdown, which waits up to the grace for running jobs
            limit = settings.shutdown_grace + self.loop_grace
            return Check(age <= limit, f"draining for {age:.1f}s" if age <= limit else
                         f"draining for {age:.1f}s, past the {settings.shutdown_grace:g}s grace")
        limit = max(settings.poll_interval, settings.fallback_poll_interval, 1.0) + self.loop_grace
        if age > limit:
            return Check(False, f"no iteration for {age:.1f}s (limit {limit:g}s)")
        return Check(True, f"last iteration {age:.1f}s ago")

    def _beat_check(self) -> Check:
        w = self.worker
        if w._done.is_set():
            return Check(False, "stopped")
        if w.last_beat_at is None:
            return Check(False, "not started")
        age = time.monotonic() - w.last_beat_at
        lease = w.settings.lease_seconds
        if age > lease:
            return Check(False, f"no heartbeat for {age:.1f}s; leases run out after {lease:g}s")
        return Check(True, f"last heartbeat {age:.1f}s ago")


def _age(mark: float | None) -> float | None:
    return None if mark is None else round(time.monotonic() - mark, 3)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: HealthServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"ourvidz-worker/{VERSION}"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        health = self.server.health
        try:
            if path == "/health":
                code, body = health.health()
                self._json(code, body)
            elif path == "/status":
                self._json(200, health.status())
            elif path == "/metrics":
                self._send(200, health.metrics.render(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": f"no such endpoint {path}", "endpoints": ["/health", "/status", "/metrics"]})
        except Exception as err:
            log.exception("health server: %s failed", path)
            self._json(500, {"error": f"{type(err).__name__}: {err}"})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, json.dumps(body, default=str).encode(), "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health server: " + format, *args)
