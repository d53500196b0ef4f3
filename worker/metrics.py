"""What one worker is doing, read from the live Worker object, and its Prometheus registry.

Shared by the health server's documents (worker.health) and `GET /metrics`; nothing here writes
rows or touches models.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.loop import VERSION, Running, Worker

log = logging.getLogger(__name__)

ARCHITECTURE = "pure_inference_engine"  # seed 001: prompts run as given, never rewritten by the worker
STATES = ("starting", "idle", "busy", "draining", "stopped")
PRESSURE_LEVELS = ("low", "medium", "high", "critical")
RUN_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, math.inf)
WAIT_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, math.inf)


def worker_state(worker: Worker) -> str:
    """starting | idle | busy | draining | stopped, as this process sees it (the workers row lags a beat)."""
    if worker._done.is_set():
        return "stopped"
    if worker.last_loop_at is None:
        return "starting"
    if worker._stop.is_set():
        return "draining"
    return "busy" if worker._running else "idle"


def running_entries(worker: Worker) -> list[Running]:
    with worker._running_lock:
        return list(worker._running.values())


def current_jobs(worker: Worker) -> list[dict[str, Any]]:
    now = time.monotonic()
    jobs = []
    for entry in running_entries(worker):
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


def worker_faults(worker: Worker) -> dict[str, str]:
    """The worker's own faults, scope -> reason; empty while it can serve everything."""
    faults = getattr(worker, "faults", None) or {}
    return {str(scope): str(reason) for scope, reason in dict(faults).items()}


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
        for entry in running_entries(w):
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
        faults = GaugeMetricFamily("ourvidz_worker_fault", "1 for each scope the worker cannot serve now "
                                   "(storage, handler:<name>, device, disk).", labels=["scope"])
        for scope in sorted(worker_faults(w)):
            faults.add_metric([scope], 1.0)
        yield faults
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
