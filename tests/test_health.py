"""/livez, /readyz, /health, /status and /metrics over real HTTP, for a real worker on a real Postgres."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PostgresServer, WorkerThread, wait_for, wait_status
from worker import db
from worker.config import Settings
from worker.handlers.base import JobContext
from worker.handlers.simulate import SimulateHandler
from worker.health import DatabaseProbe, HealthServer
from worker.jobs import Job
from worker.queue import JobQueue

REPO_ROOT = Path(__file__).resolve().parent.parent


class GateHandler:
    """Reports 42% "denoising", then holds the job until the test opens the gate."""

    concurrent = True

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.gate = threading.Event()

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        ctx.progress(0.42, "denoising")
        self.reached.set()
        while not self.gate.wait(0.02):
            ctx.check()
        return {"ok": True}


def get(url: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    code, content_type, body = get(url)
    assert content_type == "application/json", body
    return code, json.loads(body)


def samples(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    code, content_type, body = get(f"{base}/metrics")
    assert code == 200 and content_type.startswith("text/plain"), body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def sample(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return values.get((name, frozenset(labels.items())))


def healthy(base: str) -> dict[str, Any] | None:
    code, body = get_json(f"{base}/health")
    return body if code == 200 else None


def unhealthy(base: str, check: str) -> dict[str, Any] | None:
    code, body = get_json(f"{base}/health")
    return body if code == 503 and check in body["failing"] else None


def probe(base: str, path: str, code: int, *failing: str) -> dict[str, Any] | None:
    """The body of /livez or /readyz once it answers `code` with (at least) these checks failing."""
    got, body = get_json(f"{base}{path}")
    return body if got == code and set(failing) <= set(body["failing"]) else None


@pytest.fixture
def serve() -> Iterator[Callable[..., HealthServer]]:
    servers: list[HealthServer] = []

    def start(worker: WorkerThread, **options: Any) -> HealthServer:
        server = HealthServer(worker.worker, "127.0.0.1", 0, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_health_status_and_metrics_of_a_working_worker(queue: JobQueue, start_worker, serve) -> None:
    queue.upsert_job_type("gate", "test", "gate", max_attempts=1)
    gate = GateHandler()
    worker = start_worker({"simulate": SimulateHandler(), "gate": gate}, concurrency=2, memory_budget=2**30)
    base = serve(worker).url

    body = wait_for(lambda: healthy(base))
    assert body["status"] == "healthy" and body["failing"] == []
    assert body["worker_id"] == worker.worker.id and body["architecture"] == "pure_inference_engine"
    assert all(check["ok"] for check in body["checks"].values())
    assert set(body["checks"]) == {"loop", "database", "lease_keeper"}
    code, live = get_json(f"{base}/livez")
    assert code == 200 and live["status"] == "alive" and set(live["checks"]) == {"loop", "lease_keeper"}
    code, ready = get_json(f"{base}/readyz")
    assert code == 200 and ready["status"] == "ready" and ready["faults"] == {} and ready["failing"] == []
    assert set(ready["checks"]) == {"loop", "database", "lease_keeper", "faults"}

    job_id = queue.enqueue("gate", {"prompt": "held"})
    assert gate.reached.wait(15)
    code, status = get_json(f"{base}/status")
    assert code == 200 and status["state"] == "busy" and status["worker_id"] == worker.worker.id
    assert status["queues"] == ["demo", "test"] and status["all_queues"] is True
    assert status["job_types"] == ["gate", "simulate"] and status["concurrency"] == 2
    [job] = status["current_jobs"]
    assert job["job_id"] == str(job_id) and job["job_type"] == "gate" and job["queue"] == "test"
    assert job["progress"] == 42 and job["stage"] == "denoising" and job["attempt"] == 1
    assert status["loaded_models"] == ["gate"] and status["models"] == {"gate": "loaded", "simulate": "unloaded"}
    memory = status["memory"]
    assert memory["device"] == "cpu" and memory["vram_used_bytes"] is None and memory["budget_bytes"] == 2**30
    assert memory["pressure"] == "low" and memory["ram_rss_bytes"] > 0
    assert [(m["handler"], m["in_use"]) for m in memory["models"]] == [("gate", 1)]
    assert status["uptime"] > 0 and status["version"]
    running = samples(base)
    assert sample(running, "ourvidz_jobs_running", job_type="gate") == 1
    assert sample(running, "ourvidz_worker_state", state="busy") == 1
    assert sample(running, "ourvidz_jobs_claimed_total") == 1
    assert sample(running, "ourvidz_jobs_finished_total", job_type="gate", outcome="completed") is None
    assert sample(running, "ourvidz_memory_pressure", level="low") == 1
    assert sample(running, "ourvidz_memory_budget_bytes") == 2**30
    assert sample(running, "ourvidz_model_loads_total") == 1

    gate.gate.set()
    wait_status(queue, job_id, "completed")
    done = [queue.enqueue("simulate", {"config": {"steps": 2, "step_seconds": 0}}) for _ in range(2)]
    flaky = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0, "fail_code": "NETWORK_ERROR",
                                                  "fail_attempts": 1}})
    bad = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0, "fail_code": "INVALID_INPUT",
                                                "fail_attempts": 9}})
    for finished in [*done, flaky]:
        wait_status(queue, finished, "completed")
    wait_status(queue, bad, "failed")

    def counted(v: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
        return (sample(v, "ourvidz_jobs_finished_total", job_type="simulate", outcome="completed") == 3
                and sample(v, "ourvidz_jobs_finished_total", job_type="simulate", outcome="retried") == 1
                and sample(v, "ourvidz_jobs_finished_total", job_type="simulate", outcome="failed") == 1)

    after = wait_for(lambda: (v := samples(base)) and counted(v) and v)
    assert sample(after, "ourvidz_jobs_running", job_type="simulate") == 0
    assert sample(after, "ourvidz_jobs_finished_total", job_type="gate", outcome="completed") == 1
    assert sample(after, "ourvidz_job_run_seconds_count", job_type="simulate", outcome="completed") == 3
    assert sample(after, "ourvidz_job_queue_wait_seconds_count", job_type="simulate") == 5
    assert sample(after, "ourvidz_jobs_claimed_total") == 6
    assert sample(after, "ourvidz_models_loaded") == 2
    heartbeat_age = sample(after, "ourvidz_worker_heartbeat_age_seconds")
    assert heartbeat_age is not None and 0 <= heartbeat_age < 3.0
    info = sample(after, "ourvidz_worker_info", worker_id=worker.worker.id, version=status["version"],
                  architecture="pure_inference_engine", host=socket.gethostname())
    assert info == 1

    code, status = get_json(f"{base}/status")
    assert status["state"] == "idle" and status["current_jobs"] == []
    assert status["performance"] == {
        "jobs_claimed": 6, "jobs_completed": 4, "jobs_failed": 1, "jobs_retried": 1, "jobs_canceled": 0,
        "jobs_lost": 0, "jobs_released": 0, "success_rate": 80.0}
    code, body = get_json(f"{base}/nowhere")
    assert code == 404 and {"/livez", "/readyz", "/health"} <= set(body["endpoints"])


def test_health_is_503_while_the_database_refuses_connections(
    start_worker, serve, pg_server: PostgresServer, database_url: str
) -> None:
    worker = start_worker({"simulate": SimulateHandler()})
    base = serve(worker, db_timeout=1.0).url
    wait_for(lambda: healthy(base))
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    admin = db.connect(pg_server.url)  # from the maintenance database: a database cannot lock itself out
    try:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
        body = wait_for(lambda: unhealthy(base, "database"), timeout=30)
        assert body["status"] == "unhealthy" and body["checks"]["database"]["ok"] is False
        assert body["checks"]["loop"]["ok"] is True  # the loop itself lives on and retries
        # leases would run out: the lease keeper cannot beat either
        body = wait_for(lambda: unhealthy(base, "lease_keeper"), timeout=30)
        assert "no heartbeat" in body["checks"]["lease_keeper"]["detail"]
        # ... which is the database's doing: not ready, but alive (a restart would not help)
        ready = probe(base, "/readyz", 503, "database", "lease_keeper")
        assert ready is not None and ready["status"] == "not_ready"
        code, live = get_json(f"{base}/livez")
        assert code == 200 and live["status"] == "alive", live
        assert "database" in live["checks"]["lease_keeper"]["detail"]
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
    body = wait_for(lambda: healthy(base), timeout=60)
    assert body["checks"]["database"]["ok"] and body["checks"]["lease_keeper"]["ok"]
    assert wait_for(lambda: probe(base, "/readyz", 200))["status"] == "ready"


def test_health_is_503_until_the_worker_runs(settings: Settings, serve) -> None:
    worker = WorkerThread(settings, {"simulate": SimulateHandler()})  # built, not started
    try:
        base = serve(worker).url
        code, body = get_json(f"{base}/health")
        assert code == 503 and body["state"] == "starting" and body["failing"] == ["loop", "lease_keeper"]
        assert body["checks"]["loop"]["detail"] == "not started" and body["checks"]["database"]["ok"]
        assert get_json(f"{base}/livez")[0] == 200, "starting (registering may wait for the database) is alive"
        assert probe(base, "/readyz", 503, "loop", "lease_keeper") is not None
    finally:
        worker.worker.pool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_once_the_main_loop_died(queue: JobQueue, start_worker, serve) -> None:
    worker = start_worker({"simulate": SimulateHandler()})
    base = serve(worker, db_cache_seconds=0.0).url
    wait_for(lambda: healthy(base))

    def broken_claim(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the main loop")

    worker.worker.queue.claim = broken_claim  # type: ignore[method-assign]
    queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})  # NOTIFY wakes the loop into it
    worker.thread.join(30)
    assert not worker.thread.is_alive()
    code, body = get_json(f"{base}/health")
    assert code == 503 and body["status"] == "unhealthy" and body["state"] == "stopped"
    assert {"loop", "lease_keeper", "database"} <= set(body["failing"])
    assert body["checks"]["loop"]["detail"] == "stopped"
    assert probe(base, "/livez", 503, "loop", "lease_keeper") is not None
    code, status = get_json(f"{base}/status")
    assert code == 200 and status["state"] == "stopped"
    assert sample(samples(base), "ourvidz_worker_state", state="stopped") == 1


def test_health_is_503_while_the_main_loop_is_stuck(queue: JobQueue, start_worker, serve) -> None:
    worker = start_worker({"simulate": SimulateHandler()}, poll_interval=0.2)
    base = serve(worker, loop_grace=1.0).url  # stuck: no iteration for 1 s past the 1 s longest sleep
    wait_for(lambda: healthy(base))
    unstuck = threading.Event()
    claim = worker.worker.queue.claim

    def hanging_claim(*args: Any, **kwargs: Any) -> Any:
        unstuck.wait(60)  # what a claim on a dead TCP connection looks like from the loop
        return claim(*args, **kwargs)

    worker.worker.queue.claim = hanging_claim  # type: ignore[method-assign]
    try:
        job_id = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})
        body = wait_for(lambda: unhealthy(base, "loop"))
        assert body["failing"] == ["loop"] and "no iteration" in body["checks"]["loop"]["detail"]
        live = probe(base, "/livez", 503, "loop")
        assert live is not None and live["failing"] == ["loop"]
    finally:
        unstuck.set()
    wait_status(queue, job_id, "completed")
    assert wait_for(lambda: healthy(base))["checks"]["loop"]["ok"]


def test_readyz_names_the_workers_own_faults_until_they_clear(start_worker, serve) -> None:
    worker = start_worker({"simulate": SimulateHandler()}, fault_retry_seconds=3.0)
    base = serve(worker, db_cache_seconds=0.0).url
    wait_for(lambda: probe(base, "/readyz", 200))
    reason = "Supabase Storage refused the service role key (403)"
    worker.worker.add_faults({"storage": reason})  # what the loop records for a refused key
    body = probe(base, "/readyz", 503, "faults")
    assert body is not None, "a fault of the worker's own must make it not ready"
    assert body["faults"] == {"storage": reason} and body["failing"] == ["faults"]
    assert reason in body["checks"]["faults"]["detail"]
    assert get_json(f"{base}/livez")[0] == 200 and healthy(base) is not None  # alive, and /health as it was
    assert sample(samples(base), "ourvidz_worker_fault", scope="storage") == 1
    # the retry time comes, the storage check passes, the fault clears
    assert wait_for(lambda: probe(base, "/readyz", 200))["faults"] == {}
    assert sample(samples(base), "ourvidz_worker_fault", scope="storage") is None


def test_livez_fails_when_the_lease_keeper_hangs_while_the_database_answers(start_worker, serve) -> None:
    worker = start_worker({"simulate": SimulateHandler()})  # lease 3 s
    base = serve(worker, db_cache_seconds=0.0).url
    wait_for(lambda: probe(base, "/livez", 200))
    release = threading.Event()
    heartbeat = worker.worker.queue.heartbeat

    def hanging_heartbeat(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)  # a keeper stuck in a call that never returns, the database fine
        return heartbeat(*args, **kwargs)

    worker.worker.queue.heartbeat = hanging_heartbeat  # type: ignore[method-assign]
    try:
        body = wait_for(lambda: probe(base, "/livez", 503, "lease_keeper"), timeout=30)
        assert "while the database answers" in body["checks"]["lease_keeper"]["detail"]
        assert body["checks"]["loop"]["ok"] is True
    finally:
        release.set()
        worker.worker.queue.heartbeat = heartbeat  # type: ignore[method-assign]
    wait_for(lambda: probe(base, "/livez", 200))


def test_database_probe_answers_within_its_timeout_and_caches(database_url: str) -> None:
    silent = socket.socket()  # accepts connections and never speaks: a server behind a dead network
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    bad_pool = db.make_pool(f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/postgres", 1)
    try:
        started = time.monotonic()
        check = DatabaseProbe(bad_pool, timeout=1.0).check()
        assert not check.ok and time.monotonic() - started < 5
    finally:
        bad_pool.close(timeout=1)
        silent.close()

    pool = db.make_pool(database_url, 1)
    probe = DatabaseProbe(pool, timeout=2.0, ttl=60.0)
    first = probe.check()
    assert first.ok, first.detail
    pool.close()
    assert probe.check() is first  # within the ttl the database is not asked again
    probe.ttl = 0.0
    closed = probe.check()
    assert not closed.ok and "closed" in closed.detail.lower()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_run_serves_health_status_and_metrics(database_url: str, queue: JobQueue, tmp_path: Path) -> None:
    port, worker_id = free_port(), f"cli-health-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "SUPABASE_")) and k != "DATABASE_URL"}
    env.update(DATABASE_URL=database_url, OURVIDZ_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--health-port", str(port), "--worker-id", worker_id,
             "--queues", "demo"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> dict[str, Any] | None:
        assert proc.poll() is None, log_path.read_text()
        with contextlib.suppress(OSError):
            return healthy(base)
        return None

    try:
        body = wait_for(up, timeout=90, interval=0.2)
        assert body["worker_id"] == worker_id
        job_id = queue.enqueue("simulate", {"config": {"steps": 2, "step_seconds": 0}})
        wait_status(queue, job_id, "completed")
        values = wait_for(lambda: (v := samples(base)) and
                          sample(v, "ourvidz_jobs_finished_total", job_type="simulate", outcome="completed") == 1
                          and v)
        assert sample(values, "ourvidz_worker_state", state="idle") == 1
        _, status = get_json(f"{base}/status")
        assert status["worker_id"] == worker_id and status["pid"] == proc.pid and status["queues"] == ["demo"]
        assert status["performance"]["jobs_completed"] == 1 and status["all_queues"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        with pytest.raises(OSError):
            get(f"{base}/health", timeout=2)  # the server went with the worker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_health_port_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OURVIDZ_HEALTH_PORT", "9187")
    settings = Settings()
    assert settings.health_port == 9187 and settings.health_host == "0.0.0.0"
    monkeypatch.setenv("OURVIDZ_HEALTH_PORT", "70000")
    with pytest.raises(ValueError, match="health_port"):
        Settings()
