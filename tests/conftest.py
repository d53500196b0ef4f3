"""Every database test runs on a real Postgres.

Which one: TEST_DATABASE_URL if set; else a testcontainers Postgres where a Docker engine
answers; else an embedded server (pgserver wheel) started once per test run. Each test gets a
fresh database cloned from a migrated template (CREATE DATABASE ... TEMPLATE ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from worker import db
from worker.config import Settings
from worker.handlers.base import Handler, builtin_handlers
from worker.loop import Worker
from worker.queue import JobQueue
from worker.storage import LocalStorage

TEMPLATE = "ourvidz_template"


@dataclass
class PostgresServer:
    url: str  # maintenance database
    kind: str
    restart: Callable[[], None] | None = None

    def database_url(self, name: str) -> str:
        return make_conninfo(self.url, dbname=name)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield PostgresServer(url, "TEST_DATABASE_URL")
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as container:
            yield PostgresServer(container.get_connection_url(), "testcontainers")
        return
    # Outside pytest's own temp folders: pytest prunes old run folders, and a concurrent run
    # must not delete the data directory of a server that is still in use.
    folder = Path(tempfile.mkdtemp(prefix="ourvidz-test-pg-"))
    embedded = db.EmbeddedPostgres(folder / "pgdata")
    with db.connect(embedded.url) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 300")
    embedded.restart()
    yield PostgresServer(embedded.url, "embedded", restart=embedded.restart)
    embedded.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_server: PostgresServer) -> str:
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    db.migrate(pg_server.database_url(TEMPLATE))
    return TEMPLATE


@pytest.fixture
def database_url(pg_server: PostgresServer, template_db: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server.url) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    yield pg_server.database_url(name)
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        home=tmp_path / "home",
        lease_seconds=3.0,
        poll_interval=30.0,
        fallback_poll_interval=0.2,
        progress_interval=0.0,
        shutdown_grace=5.0,
        retry_base_seconds=0.2,
        retry_max_seconds=1.0,
        worker_id=f"test-worker-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def queue(database_url: str) -> Iterator[JobQueue]:
    pool = db.make_pool(database_url, 2, name="test-client")
    yield JobQueue(pool)
    pool.close()


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with db.connect(database_url) as conn:
        yield conn


class WorkerThread:
    """A real Worker running in a thread of the test process."""

    def __init__(self, settings: Settings, handlers: dict[str, Handler] | None = None,
                 max_jobs: int | None = None) -> None:
        self.worker = Worker(settings, handlers if handlers is not None else builtin_handlers(),
                             LocalStorage(settings.storage_dir), max_jobs=max_jobs)
        self.stats: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.stats = self.worker.run(install_signals=False)

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self, abort: bool = False, timeout: float = 30) -> None:
        self.worker.stop(abort=abort)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[Callable[..., WorkerThread]]:
    started: list[WorkerThread] = []

    def start(handlers: dict[str, Handler] | None = None, max_jobs: int | None = None,
              **overrides: Any) -> WorkerThread:
        worker_settings = settings.model_copy(
            update={"worker_id": f"test-worker-{uuid.uuid4().hex[:6]}", **overrides}
        )
        worker = WorkerThread(worker_settings, handlers, max_jobs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.thread.is_alive():
            worker.stop(abort=True)


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_status(queue: JobQueue, job_id: Any, *statuses: str, timeout: float = 15.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        row = queue.get_job(job_id)
        return row if row and row["status"] in statuses else None

    return wait_for(check, timeout)


# --- the tiny diffusion models, shared by the SDXL, WAN, preview, OOM, estimate and preload tests ---


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.diffusion_support import tiny_models

    return tiny_models(tmp_path_factory)


@pytest.fixture(scope="session")
def job_types(pg_server: PostgresServer, template_db: str) -> dict[str, Any]:
    """Every job type exactly as the migrations define it (tests/test_chat.py narrows it to chat)."""
    from tests.diffusion_support import read_job_types

    return read_job_types(pg_server.database_url(template_db))


@pytest.fixture(scope="module")
def sdxl(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from worker.handlers.sdxl import SdxlHandler

    handler = SdxlHandler(Settings(home=tmp_path_factory.mktemp("sdxl"), diffusion_device="cpu"),
                          model=str(models["sdxl"]))
    handler.load()
    return handler


@pytest.fixture(scope="module")
def wan(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """WAN text-to-video alone (tests/test_wan.py has its own, with VACE)."""
    from worker.handlers.wan import WanHandler

    handler = WanHandler(Settings(home=tmp_path_factory.mktemp("wan"), diffusion_device="cpu"),
                         model=str(models["wan"]), vace_model="", i2v_model="")
    handler.load()
    return handler
