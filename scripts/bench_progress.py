"""What a JobContext.progress() call costs the job thread: with the write made on the calling thread
(synchronous) and handed to the progress-writer thread (background, as the worker's contexts are), against
a real Postgres row held by a claimed job.

    python scripts/bench_progress.py [--database-url URL] [--calls 2000]

Without --database-url (or DATABASE_URL) an embedded Postgres is started in a temporary folder. Each figure
is the median (and p90) of `--calls` timed calls, after 50 untimed ones; `interval 0` writes on every call,
the default interval writes the first one only (the calls come faster than it): its max is that write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import db
from worker.config import Settings
from worker.handlers.base import JobContext
from worker.queue import JobQueue
from worker.storage import LocalStorage


def measure(queue: JobQueue, owner: JobQueue, *, background: bool, interval: float, calls: int,
            scratch: Path) -> dict[str, Any]:
    job_id = queue.enqueue("bench_progress", {})
    [job] = owner.claim(["bench_progress"], 1)
    assert job.id == job_id

    def write(progress: int, stage: str | None, partial: dict[str, Any] | None, live: Any = None) -> bool:
        return owner.report_progress(job.id, progress, stage, partial, live)

    ctx = JobContext(job, LocalStorage(scratch), write, interval, background=background)
    samples: list[float] = []
    for index in range(50 + calls):
        started = time.perf_counter()
        ctx.progress(index / (50 + calls + 1), "bench")
        if index >= 50:
            samples.append(time.perf_counter() - started)
    time.sleep(0.5)  # the writer thread's queue drains before the next run
    samples.sort()
    return {"background": background, "interval_s": interval, "calls": calls,
            "median_us": round(statistics.median(samples) * 1e6, 1),
            "p90_us": round(samples[int(0.9 * len(samples))] * 1e6, 1), "max_us": round(samples[-1] * 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-progress-"))
    embedded = None
    url = args.database_url
    if url is None:
        embedded = db.EmbeddedPostgres(folder / "pgdata")
        url = embedded.url
    try:
        db.migrate(url)
        pool = db.make_pool(url, 4, name="bench-progress")
        queue, owner = JobQueue(pool), JobQueue(pool, "bench-progress-worker", lease_seconds=60)
        queue.upsert_job_type("bench_progress", "bench", "bench", max_attempts=1)
        default_interval = Settings().progress_interval
        for interval in (0.0, default_interval):
            for background in (False, True):
                figure = measure(queue, owner, background=background, interval=interval, calls=args.calls,
                                 scratch=folder / "storage")
                print(json.dumps(figure), flush=True)
        pool.close()
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
