"""The real CLI in real processes: exclusivity across workers, SIGKILL, signals, a database
restart, and the commands end to end. Each worker is `python -m worker.cli run ...` (or the
`ourvidz-worker` script), pointed at the test's database through DATABASE_URL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PostgresServer
from worker import db
from worker.queue import JobQueue

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = "probe=tests.support:ProbeHandler"
SCRIPT = Path(sys.executable).with_name("ourvidz-worker")
TERMINAL = {"completed", "failed", "canceled"}


# --- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    worker_id: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(self, sig: signal.Signals) -> None:
        assert self.alive(), f"{self.name} exited early with {self.popen.returncode}:\n{self.output()[-3000:]}"
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.output()[-3000:]}") from None


@dataclass
class Cli:
    """Starts CLI processes with the test's environment; kills whatever is left at teardown."""

    env: dict[str, str]
    cwd: Path
    record: Path
    procs: list[Proc] = field(default_factory=list)

    def command(self, *args: str, script: bool = False) -> list[str]:
        if script and SCRIPT.exists():
            return [str(SCRIPT), *args]
        return [sys.executable, "-m", "worker.cli", *args]

    def start(self, *args: str, name: str, worker_id: str | None = None) -> Proc:
        log = self.cwd / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(self.command(*args), env=self.env, cwd=self.cwd, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log, worker_id)
        self.procs.append(proc)
        return proc

    def start_worker(self, *args: str, worker_id: str) -> Proc:
        return self.start("run", "--handler", PROBE, "--worker-id", worker_id, *args,
                          name=worker_id, worker_id=worker_id)

    def run(self, *args: str, timeout: float = 60, script: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args, script=script), env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)


def cli_env(database_url: str, home: Path, record: Path) -> dict[str, str]:
    # nothing of the caller's own deployment leaks in (a real SUPABASE_URL would reroute `jobs --watch`)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OURVIDZ_", "SUPABASE_")) and k != "DATABASE_URL"}
    env.update(
        DATABASE_URL=database_url,
        OURVIDZ_HOME=str(home),
        OURVIDZ_TEST_RECORD=str(record),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        COLUMNS="250",  # rich tables wrap at 80 columns when stdout is not a terminal
    )
    return env


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "runs.txt"


@pytest.fixture
def cli(database_url: str, tmp_path: Path, record_file: Path) -> Iterator[Cli]:
    runner = Cli(cli_env(database_url, tmp_path / "home", record_file), tmp_path, record_file)
    try:
        yield runner
    finally:
        runner.kill_all()


@pytest.fixture
def probe_type(queue: JobQueue) -> str:
    queue.upsert_job_type("probe", "test", "probe", max_attempts=3)
    return "probe"


# --- helpers -----------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               procs: Sequence[Proc] = (), what: str = "condition") -> Any:
    """Poll `predicate`; fail early, with its log, if one of `procs` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                                     f"{what}:\n{proc.output()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in procs)
            raise AssertionError(f"{what} not met within {timeout}s\n{logs}")
        time.sleep(interval)


def query(url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    """One statement on a fresh connection (survives a server restart between calls)."""
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def records(path: Path) -> list[tuple[str, int, int]]:
    """The 'job_id attempt pid' lines ProbeHandler wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid = line.split()
        out.append((job_id, int(attempt), int(pid)))
    return out


def registered(url: str, *worker_ids: str) -> bool:
    rows = query(url, "select id from workers where id = any(%s) and state <> 'stopped'", list(worker_ids))
    return len(rows) == len(worker_ids)


def worker_row(url: str, worker_id: str) -> dict[str, Any]:
    [row] = query(url, "select * from workers where id = %s", worker_id)
    return row


def stop(proc: Proc, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
    """Signal a worker and wait for it; return its exit code and how long it took."""
    t0 = time.monotonic()
    proc.send(sig)
    rc = proc.wait(timeout)
    return rc, time.monotonic() - t0


# --- 1. exclusivity ----------------------------------------------------------------------


def test_three_worker_processes_run_every_job_exactly_once(cli, queue, database_url, record_file, probe_type):
    n = 3000
    workers = [cli.start_worker("--concurrency", "4", worker_id=f"excl-{i}-{uuid.uuid4().hex[:4]}")
               for i in range(3)]
    ids = [w.worker_id for w in workers]
    wait_until(lambda: registered(database_url, *ids), timeout=60, procs=workers, what="3 workers registered")

    t0 = time.monotonic()
    queue.enqueue_many(probe_type, [{} for _ in range(n)])  # an empty payload: record the run, return
    wait_until(
        lambda: query(database_url, "select count(*) as n from jobs where status = 'completed'")[0]["n"] == n,
        timeout=120, interval=0.2, procs=workers, what=f"{n} jobs completed",
    )
    drained = time.monotonic() - t0

    for w in workers:
        rc, took = stop(w)
        assert rc == 0, f"{w.name} exited {rc}:\n{w.output()[-3000:]}"
        assert took < 15, took

    rows = query(database_url, "select id::text, status::text, attempts, worker_id, errors, result from jobs")
    assert len(rows) == n
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["attempts"] for r in rows} == {1}
    assert all(r["errors"] == [] and r["result"] == {"attempt": 1, "echo": None} for r in rows)

    runs = records(record_file)
    per_job = Counter(job_id for job_id, _, _ in runs)
    twice = [job_id for job_id, count in per_job.items() if count > 1]
    assert not twice, f"{len(twice)} jobs ran more than once, e.g. {twice[:5]}"
    assert set(per_job) == {r["id"] for r in rows}, "a job was never run, or a run was not of a job"
    assert len(runs) == n and {attempt for _, attempt, _ in runs} == {1}

    # the process that ran a job is the one that finished it (worker_id -> its registered pid)
    pid_of = {r["id"]: r["pid"] for r in query(database_url, "select id, pid from workers")}
    assert pid_of == {w.worker_id: w.pid for w in workers}
    finisher = {r["id"]: pid_of[r["worker_id"]] for r in rows}
    assert all(finisher[job_id] == pid for job_id, _, pid in runs)

    per_pid = Counter(pid for _, _, pid in runs)
    assert len(per_pid) > 1, f"only one process did any work: {per_pid}"
    assert set(per_pid) <= {w.pid for w in workers}
    states = query(database_url, "select state, current_jobs from workers where id = any(%s)", ids)
    assert all(s["state"] == "stopped" and s["current_jobs"] == [] for s in states)
    print(f"\n{n} jobs drained by 3 processes in {drained:.1f}s; runs per pid: {dict(per_pid)}")


# --- 2. SIGKILL mid-job ------------------------------------------------------------------


def test_sigkilled_worker_job_is_rescued_and_rerun(cli, queue, database_url, record_file, probe_type):
    dead_id = f"doomed-{uuid.uuid4().hex[:6]}"
    dead = cli.start_worker("--lease-seconds", "1", worker_id=dead_id)
    job_id = queue.enqueue(probe_type, {"hang_on_attempt": 1})

    def hanging() -> bool:
        row = queue.get_job(job_id)
        return (row["status"] == "processing" and row["worker_id"] == dead_id
                and (str(job_id), 1, dead.pid) in records(record_file))

    wait_until(hanging, timeout=60, procs=[dead], what="job running in the first worker")
    wait_until(lambda: queue.get_job(job_id)["stage"] == "hanging", procs=[dead], what="stage 'hanging'")
    dead.popen.send_signal(signal.SIGKILL)
    assert dead.wait(10) == -signal.SIGKILL

    # nobody renews the lease now; the row still names the dead worker until a rescue
    assert queue.get_job(job_id)["status"] == "processing"
    rescuer_id = f"rescuer-{uuid.uuid4().hex[:6]}"
    rescuer = cli.start_worker("--lease-seconds", "1", worker_id=rescuer_id)
    row = wait_until(lambda: (r := queue.get_job(job_id))["status"] in TERMINAL and r,
                     timeout=60, procs=[rescuer], what="job finished by the second worker")

    assert row["status"] == "completed", row
    assert row["attempts"] == 2 and row["result"] == {"attempt": 2, "echo": None}
    assert row["worker_id"] == rescuer_id and row["error"] is None
    [lost] = row["errors"]
    assert lost["code"] == "WORKER_LOST" and lost["worker_id"] == dead_id and lost["attempt"] == 1
    assert lost["retryable"] is True and dead_id in lost["message"]
    assert records(record_file) == [(str(job_id), 1, dead.pid), (str(job_id), 2, rescuer.pid)]
    assert worker_row(database_url, dead_id)["state"] != "stopped"  # it never got to say goodbye

    rc, _ = stop(rescuer)
    assert rc == 0, rescuer.output()[-3000:]
    # (its row's final state is not asserted: with a 1 s lease the lease keeper beats every
    # 0.33 s, and a beat landing after the final 'stopped' write overwrites it; see the report)


# --- 3. graceful shutdown through real signals -------------------------------------------


def _start_with_running_job(cli: Cli, queue: JobQueue, record_file: Path, payload: dict[str, Any],
                            *args: str) -> tuple[Proc, uuid.UUID]:
    worker = cli.start_worker(*args, worker_id=f"sig-{uuid.uuid4().hex[:6]}")
    job_id = queue.enqueue("probe", payload)
    wait_until(lambda: queue.get_job(job_id)["status"] == "processing"
               and any(r[0] == str(job_id) for r in records(record_file)),
               timeout=60, procs=[worker], what="job running")
    return worker, job_id


def test_sigterm_lets_running_job_finish_within_grace(cli, queue, database_url, record_file, probe_type):
    worker, job_id = _start_with_running_job(cli, queue, record_file, {"sleep": 1.5}, "--shutdown-grace", "10")
    rc, took = stop(worker, signal.SIGTERM)
    assert rc == 0, worker.output()[-3000:]
    assert took < 8, f"waited {took:.1f}s: longer than the job, as if it sat out the whole grace"
    row = queue.get_job(job_id)
    assert row["status"] == "completed" and row["attempts"] == 1 and row["result"]["attempt"] == 1
    state = worker_row(database_url, worker.worker_id)
    assert state["state"] == "stopped" and state["stopped_at"] is not None and state["current_jobs"] == []
    assert "completed=1" in worker.output()


def test_sigterm_past_grace_releases_job(cli, queue, database_url, record_file, probe_type):
    worker, job_id = _start_with_running_job(cli, queue, record_file, {"sleep": 60}, "--shutdown-grace", "0.5")
    rc, took = stop(worker, signal.SIGTERM)
    assert rc == 0, worker.output()[-3000:]
    assert took < 5, took
    row = queue.get_job(job_id)
    assert row["status"] == "queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert row["lease_expires_at"] is None and row["stage"] == "released" and row["errors"] == []
    assert worker_row(database_url, worker.worker_id)["state"] == "stopped"
    assert "released=1" in worker.output()


def test_second_sigint_releases_at_once(cli, queue, database_url, record_file, probe_type):
    worker, job_id = _start_with_running_job(cli, queue, record_file, {"sleep": 60}, "--shutdown-grace", "120")
    t0 = time.monotonic()
    worker.send(signal.SIGINT)
    # a second signal sent before the first was handled would merge with it (POSIX signals do
    # not queue): wait until the worker says it is draining, then press Ctrl-C again
    wait_until(lambda: worker_row(database_url, worker.worker_id)["state"] == "draining",
               timeout=10, procs=[worker], what="worker draining")
    assert queue.get_job(job_id)["status"] == "processing"  # the first signal only drains
    worker.send(signal.SIGINT)
    rc = worker.wait(15)
    took = time.monotonic() - t0
    assert rc == 0, worker.output()[-3000:]
    assert took < 5, took
    row = queue.get_job(job_id)
    assert row["status"] == "queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert worker_row(database_url, worker.worker_id)["state"] == "stopped"
    assert "released=1" in worker.output()


# --- 4. database restart -----------------------------------------------------------------


def test_worker_survives_database_restart(pg_server: PostgresServer, cli, queue, database_url, record_file,
                                          probe_type):
    if pg_server.restart is None:
        pytest.skip(f"the {pg_server.kind} server cannot be restarted from the tests")
    payload = {"steps": 20, "step_seconds": 0.05}
    worker = cli.start_worker("--concurrency", "2", worker_id=f"restart-{uuid.uuid4().hex[:6]}")
    wait_until(lambda: registered(database_url, worker.worker_id), timeout=60, procs=[worker], what="registered")
    before = [queue.enqueue(probe_type, payload) for _ in range(8)]

    def mid_run() -> bool:
        statuses = Counter(queue.get_job(j)["status"] for j in before)
        return statuses["processing"] >= 1 and statuses["queued"] >= 1 and statuses["completed"] >= 1

    wait_until(mid_run, timeout=30, interval=0.02, procs=[worker], what="some done, some running, some queued")
    at_restart = Counter(queue.get_job(j)["status"] for j in before)
    t0 = time.monotonic()
    pg_server.restart()
    restarted = time.monotonic() - t0

    # the test's own pooled client reconnects by itself (no retry here: get_job is not retried)
    assert queue.get_job(before[0])["id"] == before[0]
    after = [queue.enqueue(probe_type, payload) for _ in range(4)]
    everyone = before + after

    def all_done() -> bool:
        rows = query(database_url, "select status::text from jobs where id = any(%s)", everyone)
        return len(rows) == len(everyone) and all(r["status"] == "completed" for r in rows)

    wait_until(all_done, timeout=120, interval=0.2, procs=[worker], what="every job completed after the restart")
    recovered = time.monotonic() - t0
    rows = {r["id"]: r for r in query(database_url, "select * from jobs where id = any(%s)", everyone)}
    for job_id in everyone:
        row = rows[job_id]
        assert row["result"]["attempt"] == row["attempts"], row
        # a rerun is allowed only after a lost lease (e.g. a claim whose reply the restart ate)
        assert row["attempts"] == 1 or [e["code"] for e in row["errors"]] == ["WORKER_LOST"] * (row["attempts"] - 1)
    ran = Counter(job_id for job_id, _, _ in records(record_file))
    assert set(ran) == {str(j) for j in everyone}

    assert worker.alive(), worker.output()[-3000:]
    rc, _ = stop(worker)
    assert rc == 0, worker.output()[-3000:]
    assert worker_row(database_url, worker.worker_id)["state"] == "stopped"
    print(f"\nat restart: {dict(at_restart)}; restart took {restarted:.1f}s; "
          f"all {len(everyone)} done {recovered:.1f}s after it began")


# --- 5. the CLI end to end ---------------------------------------------------------------


@pytest.fixture
def empty_database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A database nothing was applied to, so the first `migrate` has something to do."""
    name = f"accept_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server.url) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.database_url(name)
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_cli_end_to_end(empty_database_url, tmp_path, record_file):
    url = empty_database_url
    cli = Cli(cli_env(url, tmp_path / "home", record_file), tmp_path, record_file)

    def ok(*args: str, timeout: float = 60) -> str:
        done = cli.run(*args, timeout=timeout)
        assert done.returncode == 0, f"{args}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    try:
        migrations = sorted(path.stem for path in (REPO_ROOT / "sql" / "migrations").glob("*.sql"))
        first = ok("migrate")
        assert f"applied {len(migrations)} migration(s)" in first, first
        assert [line.strip() for line in first.splitlines()[1:]] == migrations, first
        assert "applied 0 migration(s)" in ok("migrate")

        assert "sdxl_image_fast" in ok("types")
        assert "probe2" in ok("types", "add", "probe2", "--handler", "probe", "--queue", "test2")
        [jt] = query(url, "select queue, handler, enabled from job_types where name = 'probe2'")
        assert jt == {"queue": "test2", "handler": "probe", "enabled": True}
        assert any("probe2" in line and "test2" in line for line in ok("types").splitlines())

        out = ok("enqueue", "simulate", "--payload", '{"config":{"steps":2,"step_seconds":0}}')
        job_id = uuid.UUID(out.strip())
        assert query(url, "select status::text from jobs where id = %s", job_id)[0]["status"] == "queued"

        worker = cli.run("run", "--max-jobs", "1", "--worker-id", "accept-worker", timeout=90)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        assert "claimed=1, completed=1" in worker.stdout, worker.stdout
        row = query(url, "select * from jobs where id = %s", job_id)[0]
        assert row["status"] == "completed" and row["result"]["steps"] == 2 and row["worker_id"] == "accept-worker"
        assert query(url, "select state from workers where id = 'accept-worker'")[0]["state"] == "stopped"

        listed = [line for line in ok("jobs").splitlines() if str(job_id) in line]
        assert len(listed) == 1 and "completed" in listed[0] and "100%" in listed[0], listed

        watched = ok("jobs", "--watch", str(job_id))
        shown = json.loads(watched[watched.index("{"):])
        assert shown["status"] == "completed" and shown["error"] is None
        assert shown["result"] == json.loads(json.dumps(row["result"], default=str))

        bad = cli.run("enqueue", "no_such_type", "--prompt", "x")
        assert bad.returncode == 0, bad.stderr
        bad_id = uuid.UUID(bad.stdout.strip())
        failed = query(url, "select * from jobs where id = %s", bad_id)[0]
        assert failed["status"] == "failed" and failed["error"]["code"] == "UNKNOWN_JOB_TYPE"
        assert failed["attempts"] == 0 and failed["finished_at"] is not None
        watch_bad = cli.run("jobs", "--watch", str(bad_id))
        assert watch_bad.returncode == 1 and "UNKNOWN_JOB_TYPE" in watch_bad.stdout
    finally:
        cli.kill_all()


def test_watch_of_unknown_job_exits_at_once(database_url, tmp_path, record_file):
    """A mistyped id must not be followed for the 600 s of demo.follow's timeout."""
    cli = Cli(cli_env(database_url, tmp_path / "home", record_file), tmp_path, record_file)
    try:
        done = cli.run("jobs", "--watch", str(uuid.uuid4()), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("`jobs --watch <unknown id>` was still following a job that does not exist after 20 s")
    assert done.returncode != 0, done.stdout + done.stderr
