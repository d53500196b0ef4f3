"""A fleet of W worker processes on one Postgres: throughput, queue wait and model swaps per W.

    python scripts/simulate_fleet.py                      # W = 1, 2, 4 on an embedded Postgres
    python scripts/simulate_fleet.py --workers 1,2 --rate 6 --duration 20 --fifo
    DATABASE_URL=postgresql://... python scripts/simulate_fleet.py

Each W starts `ourvidz-worker run --gpus 0,..,W-1` (the supervisor: one worker process per "GPU";
on a machine without GPUs CUDA_VISIBLE_DEVICES is set and ignored) and feeds it a seeded Poisson
stream of SDXL / WAN / chat jobs at --rate jobs/s for --duration seconds. The handlers emulate
the models: a load costs seconds of sleep and a small tensor (MODEL_BYTES), a job costs its run
time in sleep, and the worker's real memory manager holds them under a budget that fits one
model, so a job whose model is not resident waits for a swap (evict + load). Affinity claiming is
on, as by default (--fifo turns it off). Sleep, not compute, stands in for the GPU: the figures
measure the queue, the claims and the swaps, which is what scale-out adds, on any machine.

Only jobs of the fleet_* types and workers named fleet-* are touched: the script deletes the ones
of earlier runs. Figures come from the rows themselves (created_at, started_at, finished_at).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from worker.handlers.base import JobContext  # noqa: E402
from worker.jobs import Job  # noqa: E402

SCALE = float(os.environ.get("FLEET_TIME_SCALE", "1"))
MODEL_BYTES = 4 * 1024 * 1024
BUDGET = "6MiB"  # one model fits, two do not
QUEUE = "fleet"


# --- emulated models (imported by the worker processes as simulate_fleet:SdxlModel etc.) ---


class _Model:
    name = ""
    load_seconds = 0.0
    run_seconds = 0.0

    def __init__(self) -> None:
        self.module: Any = None
        self.just_loaded = False

    @property
    def model_key(self) -> str:
        return f"fleet-{self.name}"

    def load(self) -> None:
        import torch

        time.sleep(self.load_seconds * SCALE)
        module = torch.nn.Module()
        module.register_buffer("weights", torch.zeros(MODEL_BYTES, dtype=torch.uint8))
        self.module, self.just_loaded = module, True

    def unload(self) -> None:
        self.module = None

    def modules(self) -> list[Any]:
        return [self.module] if self.module is not None else []

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        loaded, self.just_loaded = self.just_loaded, False
        ctx.progress(0.5, "generating")
        time.sleep(self.run_seconds * SCALE)
        return {"pid": os.getpid(), "model": self.name, "loaded": loaded}


class SdxlModel(_Model):
    name, load_seconds, run_seconds = "sdxl", 0.8, 0.25


class WanModel(_Model):
    name, load_seconds, run_seconds = "wan", 1.5, 0.8


class ChatModel(_Model):
    name, load_seconds, run_seconds = "chat", 0.5, 0.1


MODELS: dict[str, type[_Model]] = {"sdxl": SdxlModel, "wan": WanModel, "chat": ChatModel}
MIX = {"sdxl": 0.5, "wan": 0.2, "chat": 0.3}


# --- the fleet ---------------------------------------------------------------------------


@dataclass
class Result:
    workers: int
    jobs: int
    completed: int
    seconds: float
    throughput: float
    wait_p50: float
    wait_p95: float
    wait_max: float
    loads: int
    swaps: int
    per_worker: dict[str, int]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def prepare(url: str) -> None:
    from worker import db
    from worker.queue import JobQueue

    pool = db.make_pool(url, 1, name="fleet-setup")
    queue = JobQueue(pool)
    for model in MODELS:
        queue.upsert_job_type(f"fleet_{model}", QUEUE, f"fleet_{model}", max_attempts=3,
                              description="scripts/simulate_fleet.py")
    pool.close()
    with db.connect(url) as conn:
        for model in MODELS:
            conn.execute("update job_types set model = %s where name = %s", (f"fleet-{model}", f"fleet_{model}"))
        conn.execute("delete from jobs where job_type like 'fleet\\_%'")
        conn.execute("delete from workers where id like 'fleet-%'")


def run_fleet(url: str, workers: int, args: argparse.Namespace, home: Path) -> Result:
    from worker import db

    prepare(url)
    prefix = f"fleet-{workers}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "CUDA_"))}
    env.update(
        DATABASE_URL=url, OURVIDZ_HOME=str(home), OURVIDZ_MEMORY_BUDGET=BUDGET,
        OURVIDZ_AFFINITY="false" if args.fifo else "true", OURVIDZ_AFFINITY_MAX_WAIT=str(args.max_wait),
        FLEET_TIME_SCALE=str(SCALE), PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "scripts"), str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    handlers = [arg for model, cls in MODELS.items()
                for arg in ("--handler", f"fleet_{model}=simulate_fleet:{cls.__name__}")]
    command = [sys.executable, "-m", "worker.cli", "run", "--gpus", ",".join(str(i) for i in range(workers)),
               "--worker-id", prefix, "--queues", QUEUE, "--concurrency", "1", *handlers]
    log = home / f"fleet-{workers}.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with db.connect(url) as conn:
            deadline = time.monotonic() + 60
            while conn.execute("select count(*) as n from workers where id like %s and state <> 'stopped'",
                               (prefix + "-%",)).fetchone()["n"] < workers:
                if supervisor.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"workers did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)

            rng = random.Random(args.seed)
            t0 = time.monotonic()
            at = rng.expovariate(args.rate)
            submitted = 0
            while at < args.duration:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                model = rng.choices(list(MIX), weights=list(MIX.values()))[0]
                conn.execute("insert into jobs (job_type, payload) values (%s, '{}')", (f"fleet_{model}",))
                submitted += 1
                at += rng.expovariate(args.rate)

            deadline = time.monotonic() + args.drain_timeout
            while conn.execute("select count(*) as n from jobs where job_type like 'fleet\\_%' "
                               "and status in ('queued', 'processing')").fetchone()["n"]:
                if time.monotonic() > deadline or supervisor.poll() is not None:
                    raise RuntimeError(f"jobs not drained in {args.drain_timeout}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
            rows = conn.execute(
                "select status::text, worker_id, result, "
                "extract(epoch from started_at - created_at)::float8 as wait_s, created_at, finished_at "
                "from jobs where job_type like 'fleet\\_%'").fetchall()
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            supervisor.kill()

    done = [r for r in rows if r["status"] == "completed"]
    waits = [r["wait_s"] for r in done]
    span = (max(r["finished_at"] for r in done) - min(r["created_at"] for r in rows)).total_seconds()
    loads_per_pid = Counter(r["result"]["pid"] for r in done if r["result"]["loaded"])
    loads = sum(loads_per_pid.values())
    return Result(workers, len(rows), len(done), span, len(done) / span, percentile(waits, 0.5),
                  percentile(waits, 0.95), max(waits), loads, loads - len(loads_per_pid),
                  dict(Counter(r["worker_id"] for r in done)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="Fleet sizes to run, comma-separated.")
    parser.add_argument("--rate", type=float, default=4.0, help="Jobs submitted per second (Poisson).")
    parser.add_argument("--duration", type=float, default=15.0, help="Seconds of submissions per fleet size.")
    parser.add_argument("--seed", type=int, default=7, help="Same seed, same job stream for every W.")
    parser.add_argument("--fifo", action="store_true", help="Turn model-affinity claiming off.")
    parser.add_argument("--max-wait", type=float, default=10.0, help="Affinity aging bound (seconds).")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()

    from worker import db

    with tempfile.TemporaryDirectory(prefix="ourvidz-fleet-") as tmp:
        home = Path(tmp)
        server = None if args.database_url else db.EmbeddedPostgres(home / "pgdata")
        url = args.database_url or server.url  # type: ignore[union-attr]
        if server is not None:
            db.migrate(url)
        try:
            report(url, args, home)
        finally:
            if server is not None:
                server.stop()


def report(url: str, args: argparse.Namespace, home: Path) -> None:
    mix = ", ".join(f"{m} {p:.0%} (load {MODELS[m].load_seconds * SCALE:g}s, run {MODELS[m].run_seconds * SCALE:g}s)"
                    for m, p in MIX.items())
    print(f"{args.rate:g} jobs/s for {args.duration:g}s, seed {args.seed}; {mix}; one model fits; "
          f"{'FIFO' if args.fifo else f'affinity (aging bound {args.max_wait:g}s)'}")
    print(f"{'W':>2} {'jobs':>5} {'done':>5} {'span s':>7} {'jobs/s':>7} {'wait p50':>9} {'wait p95':>9} "
          f"{'wait max':>9} {'loads':>6} {'swaps':>6}  jobs per worker")
    for workers in (int(w) for w in args.workers.split(",")):
        r = run_fleet(url, workers, args, home)
        print(f"{r.workers:>2} {r.jobs:>5} {r.completed:>5} {r.seconds:>7.1f} {r.throughput:>7.2f} "
              f"{r.wait_p50:>9.2f} {r.wait_p95:>9.2f} {r.wait_max:>9.2f} {r.loads:>6} {r.swaps:>6}  "
              f"{sorted(r.per_worker.values(), reverse=True)}", flush=True)


if __name__ == "__main__":
    main()
