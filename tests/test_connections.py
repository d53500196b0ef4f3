"""Connections notice a silent partition and recover by themselves (issue 10, item 4).

A partition is emulated by a local TCP proxy between the worker and Postgres that stops forwarding
without closing anything: its bytes are read and dropped, as packets are in a partition. Being a
userspace proxy, its kernel still answers TCP keepalives, the way a pooler (Supavisor, PgBouncer)
with a partitioned far side does; so what saves the worker here is the reply timeout, and the
connect timeout for the connections it opens meanwhile. Connections the proxy held while dark
stay dead for good; after the partition, new ones are forwarded again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import WorkerThread, wait_for, wait_status
from worker import db
from worker.config import Settings
from worker.handlers.simulate import SimulateHandler
from worker.queue import JobQueue

# Short enough for a test: every wait on a dead connection ends within a couple of seconds.
FAST = {
    "db_connect_timeout": 2,  # libpq's minimum
    "db_statement_timeout": 1.0,
    "db_reply_timeout": 1.5,
    "db_keepalives_idle": 1,
    "db_keepalives_interval": 1,
    "db_keepalives_count": 2,
}


@dataclass(eq=False)
class Link:
    client: socket.socket
    server: socket.socket | None  # None: accepted while dark, never forwarded
    dead: bool = False
    closed_by_client: bool = False
    forwarded: int = 0


class BlackHoleProxy:
    """127.0.0.1:port -> the database server (TCP or its Unix socket)."""

    def __init__(self, database_url: str) -> None:
        info = conninfo_to_dict(database_url)
        host, port = info.get("host") or "localhost", int(info.get("port") or 5432)
        self.database_url = database_url
        self.target: Any = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.links: list[Link] = []
        self.dark = False
        self.refusing = False  # while dark: close new connections at once instead of swallowing them
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return make_conninfo(self.database_url, host="127.0.0.1", port=str(self.port))

    def blackhole(self) -> None:
        with self._lock:
            self.dark = True
            for link in self.links:
                link.dead = True

    def stop_server(self) -> None:
        """A database that stops as a server does: open connections are reset, new ones refused."""
        with self._lock:
            self.dark = self.refusing = True
            links, self.links = list(self.links), []
        for link in links:
            for sock in (link.client, link.server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def restore(self) -> None:
        with self._lock:
            self.dark = self.refusing = False

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for link in list(self.links):
            for sock in (link.client, link.server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                dark = self.dark
            if dark and self.refusing:
                client.close()  # refused, as by a stopped server
                continue
            server = None
            if not dark:
                family = socket.AF_UNIX if isinstance(self.target, str) else socket.AF_INET
                server = socket.socket(family, socket.SOCK_STREAM)
                server.connect(self.target)
            link = Link(client, server, dead=dark)
            with self._lock:
                self.links.append(link)
            threading.Thread(target=self._pump, args=(link,), daemon=True).start()

    def _pump(self, link: Link) -> None:
        sockets = [s for s in (link.client, link.server) if s is not None]
        try:
            while not self._closed:
                readable, _, _ = select.select(sockets, [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        link.closed_by_client = sock is link.client
                        return
                    if link.dead or link.server is None:
                        continue  # dropped, like a packet in a partition
                    (link.server if sock is link.client else link.client).sendall(data)
                    link.forwarded += 1
        except OSError:
            return
        finally:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture
def proxy(database_url: str) -> Iterator[BlackHoleProxy]:
    proxy = BlackHoleProxy(database_url)
    yield proxy
    proxy.close()


@pytest.fixture
def fast_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # The environment too: code that builds its connections from Settings() reads it from there.
    for key, value in FAST.items():
        monkeypatch.setenv(f"OURVIDZ_{key.upper()}", str(value))
    return settings.model_copy(update=FAST)


def test_pool_connections_carry_keepalives_and_timeouts(proxy, fast_settings):
    pool = db.make_pool(proxy.url, 1, name="test-options", settings=fast_settings)
    try:
        with pool.connection() as conn:
            assert conn.execute("show statement_timeout").fetchone() == {"statement_timeout": "1s"}
            sock = socket.socket(fileno=conn.fileno())
            try:  # what libpq really set on the TCP socket, not what we asked for
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
            finally:
                sock.detach()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(3)")
    finally:
        pool.close()

    pooler = db.make_pool(proxy.url, 1, name="test-pooler", prepare=False, settings=fast_settings)
    try:  # a transaction pooler would hand a session setting on to other clients
        with pooler.connection() as conn:
            assert conn.execute("show statement_timeout").fetchone() == {"statement_timeout": "0"}
    finally:
        pooler.close()

    explicit = make_conninfo(proxy.url, connect_timeout="7", keepalives_idle="5")
    with db.connect(explicit, fast_settings) as conn:
        params = conn.info.get_parameters()
        assert params["connect_timeout"] == "7" and params["keepalives_idle"] == "5", "the URL's own values win"
        assert params["keepalives_count"] == "2"


def test_a_black_holed_connection_fails_instead_of_hanging(proxy, fast_settings):
    plain = psycopg.connect(proxy.url, autocommit=True)  # the control: no reply timeout
    bounded = db.connect(proxy.url, fast_settings, reply_timeout=fast_settings.db_reply_timeout)
    proxy.blackhole()

    hung: list[BaseException] = []
    control = threading.Thread(target=lambda: _record(hung, plain.execute, "select 1"), daemon=True)
    control.start()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="no reply from the database"):
        bounded.execute("select 1")
    elapsed = time.monotonic() - started
    assert bounded.closed
    control.join(elapsed + 1.0)
    assert control.is_alive(), "without a reply timeout the same statement is still waiting (keepalives are answered)"

    with pytest.raises(psycopg.OperationalError):  # a new connection while dark: the connect timeout ends it
        db.connect(proxy.url, fast_settings)
    proxy.close()
    control.join(5)
    plain.close()


def _record(into: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as exc:
        into.append(exc)


def test_worker_resumes_by_itself_after_a_partition(proxy, fast_settings, queue: JobQueue):
    worker = WorkerThread(fast_settings.model_copy(update={
        "database_url": proxy.url, "poll_interval": 0.5, "worker_id": f"partitioned-{uuid.uuid4().hex[:6]}",
    }), {"simulate": SimulateHandler()}).start()
    payload = {"config": {"steps": 1, "step_seconds": 0}}
    try:
        before = queue.enqueue("simulate", payload)
        assert wait_status(queue, before, "completed")["worker_id"] == worker.worker.id

        proxy.blackhole()
        during = queue.enqueue("simulate", payload)  # straight to the database, not through the proxy
        wait_for(lambda: any(link.closed_by_client for link in proxy.links), timeout=15)  # the worker noticed
        assert queue.get_job(during)["status"] == "queued"
        proxy.restore()
        restored = time.monotonic()

        row = wait_status(queue, during, "completed", timeout=30)
        print(f"resumed {time.monotonic() - restored:.1f}s after the partition ended")
        assert row["worker_id"] == worker.worker.id and row["attempts"] == 1
        fresh = [link for link in proxy.links if not link.dead and link.forwarded]
        assert fresh, "the job went through a connection opened after the partition"
        assert worker.thread.is_alive()
    finally:
        worker.stop(abort=True)
