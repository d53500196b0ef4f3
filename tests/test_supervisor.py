"""`ourvidz-worker run --gpus`: the real CLI in real processes, on CPU. No GPU is needed (a stand-in
nvidia-smi lists two for the check that refuses GPUs a machine lacks): the supervisor only sets
CUDA_VISIBLE_DEVICES, and each child shows what it got through /proc/<pid>/environ and through the
jobs it runs (tests.support:EnvProbeHandler)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from worker import db
from worker.queue import JobQueue
from worker.supervisor import parse_gpus, parse_nvidia_smi

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PROBE = "envprobe=tests.support:EnvProbeHandler"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, Linux signals")


# --- helpers -----------------------------------------------------------------------------


def query(url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with db.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until(predicate: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], log: Path,
               timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited {proc.returncode} waiting for {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def proc_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def live_workers(url: str, prefix: str) -> dict[str, dict[str, Any]]:
    rows = query(url, "select * from workers where id like %s and state <> 'stopped'", prefix + "%")
    return {r["id"]: r for r in rows}


class Fleet:
    """One `run --gpus ...` supervisor process; whatever of it is left is killed at teardown."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.url = database_url
        self.prefix = f"sup-{uuid.uuid4().hex[:6]}"
        self.log = tmp_path / "supervisor.log"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OURVIDZ_", "SUPABASE_", "CUDA_")) and k != "DATABASE_URL"}
        # `run --gpus` refuses GPUs the machine lacks: a stand-in nvidia-smi lists two
        smi = tmp_path / "bin" / "nvidia-smi"
        smi.parent.mkdir(exist_ok=True)
        smi.write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\necho 'GPU 1: Stand-in (UUID: GPU-1)'\n")
        smi.chmod(0o755)
        self.env.update(DATABASE_URL=database_url, OURVIDZ_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
                        COLUMNS="200", PATH=os.pathsep.join((str(smi.parent), os.environ.get("PATH", ""))))
        self.proc: subprocess.Popen[bytes] | None = None
        self.child_pids: set[int] = set()

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", "--worker-id", self.prefix, "--handler", ENV_PROBE,
                 *args],
                env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def wait_workers(self, *ids: str) -> dict[str, dict[str, Any]]:
        assert self.proc is not None
        rows = wait_until(lambda: (w := live_workers(self.url, self.prefix)) and set(ids) <= set(w) and w,
                          f"workers {ids} registered", self.proc, self.log)
        self.child_pids |= {rows[i]["pid"] for i in ids}
        return rows

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.child_pids:
            if alive(pid) and self.prefix in " ".join(proc_cmdline(pid)):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fleet(database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    runner = Fleet(database_url, tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()


@pytest.fixture
def env_probe(queue: JobQueue) -> str:
    queue.upsert_job_type("envprobe", "gpu_test", "envprobe", max_attempts=3)
    return "envprobe"


def run_jobs(queue: JobQueue, fleet: Fleet, job_type: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert fleet.proc is not None
    ids = [queue.enqueue(job_type, p) for p in payloads]
    wait_until(lambda: all(queue.get_job(i)["status"] == "completed" for i in ids),
               f"{len(ids)} {job_type} jobs completed", fleet.proc, fleet.log)
    return [queue.get_job(i) for i in ids]


# --- the supervisor end to end -----------------------------------------------------------


def test_gpus_pins_each_child_restarts_a_crash_and_drains_on_sigterm(fleet, queue, database_url, env_probe):
    sup = fleet.start("--gpus", "0,1", "--lease-seconds", "1.5", "--shutdown-grace", "10")
    gpu0, gpu1 = f"{fleet.prefix}-gpu0", f"{fleet.prefix}-gpu1"
    rows = fleet.wait_workers(gpu0, gpu1)
    assert set(rows) == {gpu0, gpu1}, "one worker row per GPU, with distinct ids"
    gpu_of = {gpu0: "0", gpu1: "1"}
    for wid, row in rows.items():
        pid = row["pid"]
        assert pid != sup.pid and parent_pid(pid) == sup.pid, "children of the supervisor"
        env = proc_environ(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu_of[wid]
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        cmd = proc_cmdline(pid)
        # the supervisor's options reach every child; --gpus does not
        assert cmd[cmd.index("--lease-seconds") + 1] == "1.5" and ENV_PROBE in cmd and "--gpus" not in cmd

    # both children take jobs, each in its own pinned process; the built-in simulate type too
    done = run_jobs(queue, fleet, env_probe, [{"sleep": 0.4} for _ in range(6)])
    pid_of = {wid: row["pid"] for wid, row in rows.items()}
    for job in done:
        assert job["result"]["pid"] == pid_of[job["worker_id"]]
        assert job["result"]["cuda_visible_devices"] == gpu_of[job["worker_id"]]
    assert set(Counter(job["worker_id"] for job in done)) == {gpu0, gpu1}, "both GPUs' workers took jobs"
    sims = run_jobs(queue, fleet, "simulate", [{"config": {"steps": 2, "step_seconds": 0.01}} for _ in range(2)])
    assert all(s["result"]["steps"] == 2 for s in sims)

    # SIGKILL the child holding a job: the supervisor starts a new worker on the same GPU, under a
    # new id; the job comes back through its expired lease and finishes on its second attempt
    hung = queue.enqueue(env_probe, {"hang_attempt": 1})
    holder = wait_until(lambda: (j := queue.get_job(hung))["stage"] == "hanging" and j["worker_id"],
                        "a child running the hanging job", sup, fleet.log)
    os.kill(pid_of[holder], signal.SIGKILL)
    replacement = f"{holder}-r1"
    new_row = fleet.wait_workers(replacement)[replacement]
    assert new_row["pid"] != pid_of[holder] and parent_pid(new_row["pid"]) == sup.pid
    assert proc_environ(new_row["pid"])["CUDA_VISIBLE_DEVICES"] == gpu_of[holder]
    assert f"worker {holder} on GPU {gpu_of[holder]} (pid {pid_of[holder]}) exited with -9" in fleet.output()

    rescued = wait_until(lambda: (j := queue.get_job(hung))["status"] == "completed" and j,
                         "the dead child's job rescued and completed", sup, fleet.log)
    assert rescued["attempts"] == 2 and rescued["result"]["attempt"] == 2
    assert [(e["code"], e["worker_id"]) for e in rescued["errors"]] == [("WORKER_LOST", holder)]
    survivor = gpu1 if holder == gpu0 else gpu0
    live = {survivor: "1" if survivor == gpu1 else "0", replacement: gpu_of[holder]}
    pids = {survivor: pid_of[survivor], replacement: new_row["pid"]}
    more = run_jobs(queue, fleet, env_probe, [{"sleep": 0.2} for _ in range(6)])
    assert all(j["worker_id"] in live and j["result"]["cuda_visible_devices"] == live[j["worker_id"]]
               and j["result"]["pid"] == pids[j["worker_id"]] for j in more)

    # SIGTERM drains every child: each exits 0 and marks its row stopped; so does the supervisor
    sup.send_signal(signal.SIGTERM)
    try:
        rc = sup.wait(40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"supervisor still running 40 s after SIGTERM:\n{fleet.output()[-4000:]}")
    out = fleet.output()
    assert rc == 0, out[-4000:]
    for wid, pid in pids.items():
        assert f"worker {wid} on GPU {live[wid]} (pid {pid}) exited with 0" in out, out[-4000:]
        assert not alive(pid)
    states = {r["id"]: r["state"] for r in query(database_url, "select id, state from workers where id like %s",
                                                  fleet.prefix + "%")}
    assert states == {survivor: "stopped", replacement: "stopped", holder: states[holder]}
    assert states[holder] != "stopped", "the SIGKILLed child never said goodbye"


def test_children_drain_when_the_supervisor_is_killed(fleet, queue, database_url, env_probe):
    """A SIGKILLed supervisor must not leave workers behind holding GPUs: each child gets SIGTERM
    from the kernel (PR_SET_PDEATHSIG) and drains like a normal shutdown."""
    sup = fleet.start("--gpus", "0,1", "--shutdown-grace", "10")
    ids = (f"{fleet.prefix}-gpu0", f"{fleet.prefix}-gpu1")
    rows = fleet.wait_workers(*ids)
    job = queue.enqueue(env_probe, {"sleep": 1.5})
    wait_until(lambda: queue.get_job(job)["status"] == "processing", "a job running", sup, fleet.log)
    sup.kill()
    sup.wait(10)

    def stopped() -> bool:
        states = query(database_url, "select state from workers where id = any(%s)", list(ids))
        return all(s["state"] == "stopped" for s in states) and not any(alive(r["pid"]) for r in rows.values())

    deadline = time.monotonic() + 30
    while not stopped():
        assert time.monotonic() < deadline, f"children still running after the supervisor died\n{fleet.output()}"
        time.sleep(0.1)
    row = queue.get_job(job)
    assert row["status"] == "completed" and row["attempts"] == 1, "the running job finished within the grace"


def test_children_done_with_max_jobs_are_not_restarted(fleet, queue, database_url, env_probe):
    """Exit 0 is a finished worker, not a crash: with --max-jobs each child stops after its jobs
    and the supervisor exits 0 once all have."""
    jobs = [queue.enqueue(env_probe, {"sleep": 0.5}) for _ in range(2)]
    sup = fleet.start("--gpus", "0,1", "--max-jobs", "1")
    try:
        rc = sup.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"supervisor still running:\n{fleet.output()[-4000:]}")
    assert rc == 0, fleet.output()[-4000:]
    rows = [queue.get_job(j) for j in jobs]
    assert all(r["status"] == "completed" for r in rows)
    workers = query(database_url, "select id, state from workers where id like %s order by id", fleet.prefix + "%")
    assert workers == [{"id": f"{fleet.prefix}-gpu0", "state": "stopped"},
                       {"id": f"{fleet.prefix}-gpu1", "state": "stopped"}], "no restart after a clean exit"
    assert sorted(r["worker_id"] for r in rows) == [w["id"] for w in workers], "one job each"


# --- which GPUs --------------------------------------------------------------------------

NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-6f0a2c1e-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7f0a2c1e-0000-0000-0000-000000000001)
  MIG 3g.20gb     Device  0: (UUID: MIG-aaaaaaaa-0000-0000-0000-000000000000)
  MIG 3g.20gb     Device  1: (UUID: MIG-bbbbbbbb-0000-0000-0000-000000000000)
GPU 2: NVIDIA L4 (UUID: GPU-8f0a2c1e-0000-0000-0000-000000000002)
"""


def test_nvidia_smi_listing_gives_ordinals_and_mig_instances():
    assert parse_nvidia_smi(NVIDIA_SMI_L) == [
        "0", "MIG-aaaaaaaa-0000-0000-0000-000000000000", "MIG-bbbbbbbb-0000-0000-0000-000000000000", "2"]
    assert parse_nvidia_smi("") == []


def test_gpu_lists_follow_cuda_visible_devices():
    assert parse_gpus("0,1", env={}) == ["0", "1"]
    assert parse_gpus(" 1 , 0 ", env={}) == ["1", "0"]
    # ordinals count the GPUs this process may use, as CUDA numbers them
    assert parse_gpus("0,1", env={"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert parse_gpus("all", env={"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert parse_gpus("all", env={"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at an invalid entry
    assert parse_gpus("GPU-abc", env={}) == ["GPU-abc"]
    for bad, env in (("0,0", {}), ("", {}), ("x", {}), ("2", {"CUDA_VISIBLE_DEVICES": "0,1"}),
                     ("all", {"CUDA_VISIBLE_DEVICES": ""})):
        with pytest.raises(typer.BadParameter):
            parse_gpus(bad, env=env)


def test_gpus_all_without_any_gpu_is_refused(fleet):
    """No GPU to use: `--gpus all` must say so instead of starting workers on nothing."""
    fleet.env["CUDA_VISIBLE_DEVICES"] = ""
    proc = fleet.start("--gpus", "all")
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    assert proc.returncode == 2, fleet.output()[-3000:]
    assert "no GPU found" in fleet.output()
    assert query(fleet.url, "select id from workers") == []


def test_children_get_the_given_options_and_a_port_each():
    from worker.cli import app
    from worker.config import Settings
    from worker.supervisor import Supervisor, passthrough

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    given = ["--gpus", "0,1", "--handler", "a=m:A", "--handler", "b=m:B", "--no-listen", "--verbose",
             "--lease-seconds", "2", "--health-port", "9000", "--worker-id", "box"]
    with command.make_context("run", given) as ctx:
        args, ports = passthrough(ctx, ("gpus", "worker_id"), Settings())
    assert args == ["--handler", "a=m:A", "--handler", "b=m:B", "--lease-seconds", "2.0", "--no-listen", "--verbose"]
    assert ports == {"--health-port": 9000}
    sup = Supervisor(["0", "1"], args, "box", ports)
    second = sup.command(sup.children[1])
    assert second[second.index("--health-port") + 1] == "9001" and second[-2:] == ["--worker-id", "box-gpu1"]
    assert "--gpus" not in second and sup.child_env(sup.children[1])["CUDA_VISIBLE_DEVICES"] == "1"

    # a port from the environment (OURVIDZ_HEALTH_PORT) is spread too; 0 (any free port) stays 0
    with command.make_context("run", ["--gpus", "0,1"]) as ctx:
        assert passthrough(ctx, ("gpus", "worker_id"), Settings(health_port=7000)) == ([], {"--health-port": 7000})
    zero = Supervisor(["0", "1"], [], "box", {"--health-port": 0})
    assert zero.command(zero.children[1])[-4:-2] == ["--health-port", "0"]
