"""HTTP health, status and metrics of one running worker (`ourvidz-worker run --health-port N`).

- `GET /livez`: 200 while the main loop iterates and the lease keeper goes round, 503 when either
  died or hangs: what a restart fixes. A database outage never fails it (the keeper's beats fail
  then, which the database is to blame for), so an outage does not restart every GPU pod.
- `GET /readyz`: 200 while the worker can take jobs: the database answers, the loop and the lease
  keeper beat, and the worker has no fault of its own (`Worker.faults`: storage refused, a model
  that cannot load here, ...); 503 with the reasons otherwise.
- `GET /health`: 200 `{"status": "healthy", ...}` while the main loop iterates, the database
  answers and the lease keeper beats; 503 with the failing checks otherwise (the seeds' shape).
  The database check is cached for about a second so probes cannot hammer it.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from psycopg_pool import ConnectionPool

from worker.loop import VERSION, Worker
from worker.metrics import (
    ARCHITECTURE,
    WorkerMetrics,
    current_jobs,
    loaded_models,
    memory_snapshot,
    running_entries,
    worker_faults,
    worker_state,
)

log = logging.getLogger(__name__)

ENDPOINTS = ("/livez", "/readyz", "/health", "/status", "/metrics")


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


# --- the server ------------------------------------------------------------------------------


class HealthServer:
    """Serves /livez, /readyz, /health, /status and /metrics for one worker from a daemon thread.

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
        log.info("health server on port %d: %s", self.port, " ".join(ENDPOINTS))
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

    def livez(self) -> tuple[int, dict[str, Any]]:
        checks = {"loop": self._loop_check(starting_ok=True), "lease_keeper": self._keeper_alive_check()}
        failing = [name for name, check in checks.items() if not check.ok]
        return (503 if failing else 200), {
            "status": "dead" if failing else "alive",
            **self._identity(),
            "checks": {name: check.to_json() for name, check in checks.items()},
            "failing": failing,
        }

    def readyz(self) -> tuple[int, dict[str, Any]]:
        faults = worker_faults(self.worker)
        checks = {**self.checks(), "faults": Check(not faults, "; ".join(f"{scope}: {reason}" for scope, reason
                                                                         in sorted(faults.items())) or "none")}
        failing = [name for name, check in checks.items() if not check.ok]
        return (503 if failing else 200), {
            "status": "not_ready" if failing else "ready",
            **self._identity(),
            "checks": {name: check.to_json() for name, check in checks.items()},
            "failing": failing,
            "faults": faults,
        }

    def _identity(self) -> dict[str, Any]:
        w = self.worker
        return {"worker_id": w.id, "state": worker_state(w), "version": VERSION}

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
            "active_jobs": len(running_entries(w)),
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
            "faults": worker_faults(w),
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

    def _loop_check(self, starting_ok: bool = False) -> Check:
        w = self.worker
        if w._done.is_set():
            return Check(False, "stopped")
        if w.last_loop_at is None:  # registering needs the database: an outage may hold a worker here
            return Check(starting_ok, "starting" if starting_ok else "not started")
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


    def _keeper_alive_check(self) -> Check:
        """The lease keeper goes round: it beat within a lease, or its beats fail because the
        database does not answer (it says so itself, or the probe does)."""
        w = self.worker
        beat = self._beat_check()
        if beat.ok or w._done.is_set():
            return beat
        if w.last_beat_at is None:
            return Check(True, "starting")
        if getattr(w, "_connected_since", 0) is None:
            return Check(True, f"{beat.detail}: its heartbeats fail, the database does not answer")
        database = self.database.check()
        if not database.ok:
            return Check(True, f"{beat.detail}: the database does not answer ({database.detail})")
        return Check(False, f"{beat.detail} while the database answers")


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
            if path == "/livez":
                self._json(*health.livez())
            elif path == "/readyz":
                self._json(*health.readyz())
            elif path == "/health":
                code, body = health.health()
                self._json(code, body)
            elif path == "/status":
                self._json(200, health.status())
            elif path == "/metrics":
                self._send(200, health.metrics.render(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": f"no such endpoint {path}", "endpoints": list(ENDPOINTS)})
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
