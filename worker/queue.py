"""The only place with job-table SQL. Every statement can be pasted into psql as it is.

Every write a worker makes to a job it runs is fenced by (id, status 'processing', worker_id):
zero rows updated means the lease was lost, and the worker stops touching that job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, ParamSpec, TypedDict, TypeVar
from uuid import UUID

from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import ConnectionPool
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from worker.db import TRANSIENT_DB_ERRORS, Connection
from worker.estimate import LiveUpdate
from worker.jobs import Job, JobType, load_json_leniently

# Rows hold what users wrote: a JSON value Python cannot load (a 4,401-digit number) must fail its
# own job, not the claim that returned it with others.
set_json_loads(load_json_leniently)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# -- claim_jobs -- take up to %(limit)s due jobs of the served types (sql/migrations/*_fair_claim.sql,
# as replaced by *_strict_caps.sql: while a cap is set, claims take turns so each counts the last's):
# highest priority first; then, when models are loaded here, their types (model affinity), but not
# past a job that waited longer than %(aging_seconds)s; then by turn, so users take turns; then the
# oldest. Each type's queue is read from its head, %(window)s + %(limit)s rows at most, so the cost
# is the same at any backlog. The function pins its plan; claim_order is the position in that order.
CLAIM_JOBS = """
SELECT * FROM public.claim_jobs(%(job_types)s, %(limit)s, %(affine_types)s, %(window)s,
                                %(aging_seconds)s, %(worker_id)s, %(lease_seconds)s)
"""

CLAIM_SLACK = 8  # head rows a claim reads past what it takes, without affinity

# -- next_due -- when the earliest not-yet-due job of the served types becomes due (jobs_due_idx,
# one probe per type). Jobs due before the last claim are left out: they are claimable, or held by
# a cap or a lock, and then a finish, a notify or the next poll wakes the worker, not a timer. The
# caller says how long ago that claim was (a second after a claim that just came back, for those
# that came due just after it; longer for a claim that took every slot, since nothing could start
# until one freed).
NEXT_DUE = """
SELECT min(d.run_at) AS run_at
FROM unnest(%(job_types)s::text[]) AS t(job_type)
CROSS JOIN LATERAL (
    SELECT j.run_at FROM public.jobs AS j
    WHERE j.status = 'queued' AND j.job_type = t.job_type
      AND j.run_at > now() - make_interval(secs => %(since_seconds)s)
    ORDER BY j.run_at
    LIMIT 1
) AS d
"""

# -- heartbeat -- extend the leases of this worker's running jobs and beat its own row, with its
# memory (loaded models, VRAM, pressure) when given; NULL memory parameters leave those columns as they are.
HEARTBEAT = """
WITH beat AS (
    UPDATE public.workers
    SET heartbeat_at = now(), state = %(state)s, current_jobs = %(job_ids)s::uuid[],
        loaded_models = coalesce(%(loaded_models)s::jsonb, loaded_models),
        vram_used_mb = coalesce(%(vram_used_mb)s::integer, vram_used_mb),
        vram_total_mb = coalesce(%(vram_total_mb)s::integer, vram_total_mb),
        memory_used_mb = coalesce(%(memory_used_mb)s::integer, memory_used_mb),
        memory_budget_mb = coalesce(%(memory_budget_mb)s::integer, memory_budget_mb),
        memory_pressure = coalesce(%(memory_pressure)s::text, memory_pressure),
        faults = %(faults)s::jsonb
    WHERE id = %(worker_id)s AND state <> 'stopped'
)
UPDATE public.jobs
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = ANY(%(job_ids)s::uuid[]) AND status = 'processing' AND worker_id = %(worker_id)s
RETURNING id, cancel_requested
"""

# -- report_progress -- a throttled progress write; doubles as a heartbeat for the job. With %(live)s
# it also sets the estimate (seconds left from now; NULL: unknown) and, when %(preview_changed)s,
# the preview. The estimate moves only when it changes by more than max(1 s, 5 %): a steady job's
# stays put, and the row (and Realtime's job_live event) is not rewritten for jitter.
REPORT_PROGRESS = """
UPDATE public.jobs
SET progress = %(progress)s,
    stage = %(stage)s,
    result = coalesce(%(partial)s, result),
    estimated_completion_at = CASE
        WHEN NOT %(live)s THEN estimated_completion_at
        WHEN %(eta_seconds)s::float8 IS NULL THEN NULL
        WHEN estimated_completion_at IS NOT NULL
             AND abs(extract(epoch FROM estimated_completion_at - now()) - %(eta_seconds)s::float8)
                 <= greatest(1.0, 0.05 * %(eta_seconds)s::float8)
            THEN estimated_completion_at
        ELSE now() + make_interval(secs => %(eta_seconds)s::float8)
    END,
    preview = CASE WHEN %(preview_changed)s THEN %(preview)s::jsonb ELSE preview END,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = %(id)s AND status = 'processing' AND worker_id = %(worker_id)s
RETURNING cancel_requested
"""

# -- finish_jobs -- apply a batch of outcomes; rows this worker no longer holds are skipped.
FINISH_JOBS = """
UPDATE public.jobs AS j
SET status = o.status::public.job_status,
    result = CASE WHEN o.status = 'completed' THEN o.result ELSE NULL END,
    error = o.error,
    errors = CASE WHEN o.error IS NULL THEN j.errors
                  ELSE j.errors || jsonb_build_array(o.error || jsonb_build_object(
                       'attempt', j.attempts, 'worker_id', j.worker_id, 'at', now()))
             END,
    progress = CASE WHEN o.status = 'completed' THEN 100
                    WHEN o.status = 'queued' THEN 0 ELSE j.progress END,
    stage = CASE WHEN o.refund THEN 'returned' ELSE o.status END,
    -- a job given back for the worker's own fault keeps its place and its attempt
    attempts = CASE WHEN o.refund THEN greatest(j.attempts - 1, 0) ELSE j.attempts END,
    run_at = CASE WHEN o.status = 'queued' AND NOT o.refund THEN now() + make_interval(secs => o.retry_delay)
                  ELSE j.run_at END,
    worker_id = CASE WHEN o.status = 'queued' THEN NULL ELSE j.worker_id END,
    lease_expires_at = NULL,
    finished_at = CASE WHEN o.status = 'queued' THEN NULL ELSE now() END
FROM jsonb_to_recordset(%(outcomes)s)
     AS o(id uuid, status text, result jsonb, error jsonb, retry_delay float8, refund boolean)
WHERE j.id = o.id AND j.status = 'processing' AND j.worker_id = %(worker_id)s
RETURNING j.id, j.status
"""

# -- release_jobs -- give running jobs back at shutdown; the interrupted attempt is not counted,
# and run_at is kept, so the job runs before younger jobs of its priority.
RELEASE_JOBS = """
UPDATE public.jobs
SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, progress = 0,
    stage = 'released', attempts = greatest(attempts - 1, 0)
WHERE id = ANY(%(job_ids)s::uuid[]) AND status = 'processing' AND worker_id = %(worker_id)s
RETURNING id
"""

# -- rescue_expired -- jobs whose worker stopped renewing the lease: retry (keeping run_at, so the job
# keeps its place in the queue), or fail at the limit.
RESCUE_EXPIRED = """
WITH expired AS (
    SELECT id
    FROM public.jobs
    WHERE status = 'processing' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
),
lost AS (
    SELECT j.id,
           CASE WHEN j.cancel_requested THEN 'canceled'
                WHEN j.attempts >= j.max_attempts THEN 'failed'
                ELSE 'queued' END AS next_status,
           jsonb_build_object(
               'code', 'WORKER_LOST',
               'message', format('worker %%s stopped renewing its lease (attempt %%s of %%s)',
                                 j.worker_id, j.attempts, j.max_attempts),
               'retryable', j.attempts < j.max_attempts,
               'attempt', j.attempts, 'worker_id', j.worker_id, 'at', now()) AS error
    FROM public.jobs AS j JOIN expired USING (id)
)
UPDATE public.jobs AS j
SET status = lost.next_status::public.job_status,
    error = CASE WHEN lost.next_status = 'failed' THEN lost.error - 'attempt' - 'worker_id' - 'at'
                 ELSE j.error END,
    errors = j.errors || jsonb_build_array(lost.error),
    worker_id = CASE WHEN lost.next_status = 'queued' THEN NULL ELSE j.worker_id END,
    lease_expires_at = NULL,
    progress = CASE WHEN lost.next_status = 'queued' THEN 0 ELSE j.progress END,
    stage = CASE WHEN lost.next_status = 'queued' THEN 'rescued' ELSE lost.next_status END,
    finished_at = CASE WHEN lost.next_status = 'queued' THEN NULL ELSE now() END
FROM lost
WHERE j.id = lost.id
RETURNING j.id, j.status
"""

# -- served_job_types -- the enabled types this worker has handlers for, on its queues.
SERVED_JOB_TYPES = """
SELECT name, queue, handler, model, content_type, file_extension, bucket, defaults,
       expected_seconds, max_run_seconds, limits, max_attempts, enabled
FROM public.job_types
WHERE enabled AND handler = ANY(%(handlers)s)
  AND (cardinality(%(queues)s::text[]) = 0 OR queue = ANY(%(queues)s::text[]))
ORDER BY name
"""

# -- queue_handlers -- the handlers the enabled job types of these queues need (empty: all queues); the
# preflight's question, asked on its own connection before the worker's pool exists.
QUEUE_HANDLERS = """
SELECT DISTINCT handler
FROM public.job_types
WHERE enabled AND (cardinality(%(queues)s::text[]) = 0 OR queue = ANY(%(queues)s::text[]))
"""

# -- register_worker -- (re)announce this worker; no row back when a live worker (one that beat
# within %(live_seconds)s and is not stopped) already has this id.
REGISTER_WORKER = """
INSERT INTO public.workers (id, host, pid, queues, job_types, state, version, started_at, heartbeat_at)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(job_types)s, 'idle', %(version)s, now(), now())
ON CONFLICT (id) DO UPDATE
SET host = excluded.host, pid = excluded.pid, queues = excluded.queues, job_types = excluded.job_types,
    state = 'idle', version = excluded.version, started_at = now(), heartbeat_at = now(),
    stopped_at = NULL, current_jobs = '{}', loaded_models = '[]', vram_used_mb = NULL, vram_total_mb = NULL,
    memory_used_mb = NULL, memory_budget_mb = NULL, memory_pressure = NULL, faults = '{}'
WHERE workers.state = 'stopped' OR workers.heartbeat_at < now() - make_interval(secs => %(live_seconds)s)
RETURNING id
"""

# -- live_worker -- who holds a worker id now (for the refusal's message).
LIVE_WORKER = "SELECT host, pid, state, heartbeat_at FROM public.workers WHERE id = %(id)s"

# -- set_worker_state -- idle | busy | draining | stopped.
SET_WORKER_STATE = """
UPDATE public.workers
SET state = %(state)s, heartbeat_at = now(),
    stopped_at = CASE WHEN %(state)s = 'stopped' THEN now() ELSE NULL END,
    current_jobs = CASE WHEN %(state)s = 'stopped' THEN '{}' ELSE current_jobs END,
    loaded_models = CASE WHEN %(state)s = 'stopped' THEN '[]' ELSE loaded_models END
WHERE id = %(id)s
"""

# -- enqueue -- what a frontend's insert does, for the CLI and tests.
ENQUEUE = """
INSERT INTO public.jobs (job_type, payload, priority, user_id, run_at, max_attempts)
VALUES (%(job_type)s, %(payload)s, %(priority)s, %(user_id)s, coalesce(%(run_at)s, now()), %(max_attempts)s)
RETURNING id
"""

# -- enqueue_many -- one statement for a batch of payloads of one type.
ENQUEUE_MANY = """
INSERT INTO public.jobs (job_type, payload, priority, user_id)
SELECT %(job_type)s, p, %(priority)s, %(user_id)s
FROM jsonb_array_elements(%(payloads)s) AS p
"""

# -- request_cancel -- what a frontend's cancel does; a queued job is canceled by the trigger.
REQUEST_CANCEL = """
UPDATE public.jobs SET cancel_requested = true
WHERE id = %(id)s AND status IN ('queued', 'processing') AND NOT cancel_requested
RETURNING id, status
"""

# -- get_job -- one row as a frontend sees it.
GET_JOB = "SELECT * FROM public.jobs WHERE id = %(id)s"

# -- recent_jobs -- newest first, with wait and run times.
RECENT_JOBS = """
SELECT id, job_type, status, progress, stage, attempts, max_attempts, worker_id, error,
       created_at, started_at, finished_at,
       extract(epoch FROM coalesce(started_at, now()) - created_at) AS wait_seconds,
       extract(epoch FROM coalesce(finished_at, now()) - started_at) AS run_seconds
FROM public.jobs
WHERE (%(status)s::text IS NULL OR status::text = %(status)s)
ORDER BY created_at DESC
LIMIT %(limit)s
"""

# -- read_dashboard -- one of the dashboard views (sql/migrations/*_dashboards.sql), by name.
DASHBOARD_VIEWS = ("queue_depth", "job_latency_24h", "job_failure_rates_24h", "job_throughput_hourly",
                   "workers_stale", "worker_memory", "user_usage")
READ_DASHBOARD = "SELECT * FROM public.{view} LIMIT %(limit)s"

# -- list_job_types --
LIST_JOB_TYPES = "SELECT * FROM public.job_types ORDER BY queue, name"

# -- upsert_job_type -- register a type served by a custom handler.
# A NULL parameter keeps the existing row's value (a new row: the column default). NOT NULL is
# checked on the proposed row before the conflict is seen, hence the old values in VALUES too.
UPSERT_JOB_TYPE = """
INSERT INTO public.job_types AS t (name, queue, handler, defaults, max_attempts, content_type, bucket,
                                   file_extension, expected_seconds, description, enabled)
SELECT %(name)s, coalesce(%(queue)s, old.queue), coalesce(%(handler)s, old.handler),
       coalesce(%(defaults)s, old.defaults, '{}'), coalesce(%(max_attempts)s, old.max_attempts, 3),
       coalesce(%(content_type)s, old.content_type), coalesce(%(bucket)s, old.bucket),
       coalesce(%(file_extension)s, old.file_extension), coalesce(%(expected_seconds)s, old.expected_seconds),
       coalesce(%(description)s, old.description), coalesce(%(enabled)s, old.enabled, true)
FROM (SELECT) AS one LEFT JOIN public.job_types AS old ON old.name = %(name)s
ON CONFLICT (name) DO UPDATE
SET queue = coalesce(%(queue)s, t.queue), handler = coalesce(%(handler)s, t.handler),
    defaults = coalesce(%(defaults)s, t.defaults), max_attempts = coalesce(%(max_attempts)s, t.max_attempts),
    content_type = coalesce(%(content_type)s, t.content_type), bucket = coalesce(%(bucket)s, t.bucket),
    file_extension = coalesce(%(file_extension)s, t.file_extension),
    expected_seconds = coalesce(%(expected_seconds)s, t.expected_seconds),
    description = coalesce(%(description)s, t.description), enabled = coalesce(%(enabled)s, t.enabled),
    updated_at = now()
RETURNING t.*, (t.xmax = 0) AS created
"""


def _db_retry(fn: Callable[P, R]) -> Callable[P, R]:
    """Transient database errors (restart, failover) are retried in-process for a while."""
    return retry(
        retry=retry_if_exception_type(TRANSIENT_DB_ERRORS),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0),
        stop=stop_after_delay(15),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "database unavailable (%s), retrying", state.outcome and state.outcome.exception()
        ),
    )(fn)


class LeaseLost(Exception):
    """The fenced write found no row: another worker owns this job now."""


class WorkerIdInUse(Exception):
    """A live worker already runs under this id: every fence is keyed on it, so a second is refused."""


@dataclass(frozen=True)
class Outcome:
    job_id: UUID
    status: Literal["completed", "failed", "canceled", "queued"]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_delay: float = 0.0
    refund: bool = False  # given back for the worker's own fault: attempt and place in the queue kept

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.job_id),
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "retry_delay": self.retry_delay,
            "refund": self.refund,
        }


class Claimed(list[Job]):
    """The jobs of one claim, in claim order. more_queued: whether due jobs were left in the queues
    it read (False: claiming again finds nothing until a job is queued or comes due)."""

    more_queued: bool = False


class WorkerMemory(TypedDict):
    """The memory columns of a workers row, as worker.memory.MemoryManager.report() gives them."""

    loaded_models: list[dict[str, Any]]
    vram_used_mb: int | None
    vram_total_mb: int | None
    memory_used_mb: int | None
    memory_budget_mb: int | None
    memory_pressure: str | None


MEMORY_COLUMNS = tuple(WorkerMemory.__annotations__)


@dataclass
class Heartbeat:
    held: set[UUID] = field(default_factory=set)
    cancel_requested: set[UUID] = field(default_factory=set)


class JobQueue:
    """Job-table operations for one worker (or for the CLI, with worker_id=None)."""

    def __init__(
        self, pool: ConnectionPool[Connection], worker_id: str | None = None, lease_seconds: float = 30.0,
        *, async_commit: bool = False,
    ) -> None:
        self.pool = pool
        self.async_commit = async_commit  # the pool's sessions run with synchronous_commit off
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds

    def _execute(self, query: str, params: dict[str, Any], *, durable: bool = False,
                 conn: Connection | None = None) -> list[dict[str, Any]]:
        """Run one statement in its own transaction, on a connection of the pool or on `conn`
        (an autocommit connection configured as the pool's, see db.configure_session).

        On a pool made with `async_commit=True` (the worker's) statements commit without waiting
        for the WAL flush: claims, heartbeats, progress and rescues lost in a database crash are
        fenced or redone. `durable=True` (a job's outcome, a release) waits for the flush, so a
        result a frontend has seen never disappears.
        """
        if conn is None:
            with self.pool.connection() as pooled:
                return self._execute(query, params, durable=durable, conn=pooled)
        if durable and self.async_commit:
            with conn.pipeline(), conn.transaction():  # one round trip for SET, statement, COMMIT
                conn.execute("SET LOCAL synchronous_commit TO on")
                cur = conn.execute(query, params)
        else:
            cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    # -- worker side --------------------------------------------------------------------

    @_db_retry
    def served_job_types(self, handlers: Iterable[str], queues: Sequence[str]) -> list[JobType]:
        rows = self._execute(SERVED_JOB_TYPES, {"handlers": list(handlers), "queues": list(queues)})
        return [JobType.model_validate(row) for row in rows]

    @_db_retry
    def register_worker(self, host: str, pid: int, queues: Sequence[str], job_types: Sequence[str],
                        version: str, *, live_seconds: float = 30.0) -> None:
        """Announce this worker; WorkerIdInUse when a live worker has the id. A predecessor that died
        without saying so (its heartbeat stopped) is waited for until it counts as gone."""
        params = {"id": self.worker_id, "host": host, "pid": pid, "queues": list(queues),
                  "job_types": list(job_types), "version": version, "live_seconds": live_seconds}
        first_beat = None
        deadline = time.monotonic() + live_seconds + 1.0
        while True:
            if self._execute(REGISTER_WORKER, params):
                return
            holder = self._execute(LIVE_WORKER, {"id": self.worker_id})
            beat = holder[0]["heartbeat_at"] if holder else None
            first_beat = first_beat or beat
            if beat != first_beat or time.monotonic() > deadline:
                where = f" (host {holder[0]['host']}, pid {holder[0]['pid']})" if holder else ""
                raise WorkerIdInUse(f"worker id {self.worker_id!r} is already in use by a live worker{where}; "
                                    f"give each worker its own --worker-id")
            time.sleep(min(1.0, live_seconds / 10))

    @_db_retry
    def set_worker_state(self, state: str) -> None:
        self._execute(SET_WORKER_STATE, {"id": self.worker_id, "state": state})

    def claim(self, job_types: Sequence[str], limit: int, *, affine_types: Sequence[str] = (),
              window: int = 256, aging_seconds: float = 300.0, conn: Connection | None = None) -> Claimed:
        """Claim up to `limit` jobs, in claim order; `affine_types` (models loaded here) may be taken
        ahead of their turn from about the first `window` queued jobs of the served types. On `conn`
        when given (the worker's listener claims on its own connection), else on the pool's."""
        types = list(job_types)
        if not types or limit < 1:
            return Claimed()
        # Each type's queue is read from its head: the reach is shared out among the types, and a
        # few rows more than the claim needs let a cap or another worker's locks pass over some.
        reach = max(limit, -(-window // len(types))) if affine_types else max(limit, CLAIM_SLACK)
        # Not retried here: a claim that committed but whose reply was lost must not be
        # repeated blindly; those rows come back through the lease rescue.
        rows = self._execute(CLAIM_JOBS, {
            "job_types": types, "limit": limit, "affine_types": list(affine_types),
            "window": reach, "aging_seconds": aging_seconds,
            "worker_id": self.worker_id, "lease_seconds": self.lease_seconds,
        }, conn=conn)  # not durable: a claim lost in a crash only means the job is claimed again
        rows.sort(key=lambda row: row.pop("claim_order"))
        claimed = Claimed(Job.model_validate(row) for row in rows)
        claimed.more_queued = any([row.pop("more_queued") for row in rows])
        return claimed

    def next_due(self, job_types: Sequence[str], since_seconds: float = 1.0,
                 conn: Connection | None = None) -> datetime | None:
        """When the earliest queued job of these types that came due less than `since_seconds` ago,
        or is not due yet, is (or was) due; None when there is none."""
        rows = self._execute(NEXT_DUE, {"job_types": list(job_types), "since_seconds": since_seconds}, conn=conn)
        return rows[0]["run_at"] if rows else None

    def heartbeat(self, job_ids: Iterable[UUID], state: str, memory: WorkerMemory | None = None,
                  faults: dict[str, str] | None = None) -> Heartbeat:
        columns: dict[str, Any] = {name: (memory or {}).get(name) for name in MEMORY_COLUMNS}
        columns["faults"] = Jsonb(faults or {})
        if columns["loaded_models"] is not None:
            columns["loaded_models"] = Jsonb(columns["loaded_models"])
        rows = self._execute(HEARTBEAT, {"worker_id": self.worker_id, "job_ids": list(job_ids),
                                         "state": state, "lease_seconds": self.lease_seconds, **columns})
        return Heartbeat(
            held={row["id"] for row in rows},
            cancel_requested={row["id"] for row in rows if row["cancel_requested"]},
        )

    def report_progress(self, job_id: UUID, progress: int, stage: str | None,
                        partial: dict[str, Any] | None = None, live: LiveUpdate | None = None) -> bool:
        """Write progress (and with `live` the estimate and the preview); return whether a cancel was
        requested. Raises LeaseLost."""
        preview = live["preview"] if live else None
        rows = self._execute(REPORT_PROGRESS, {
            "id": job_id, "worker_id": self.worker_id, "progress": progress, "stage": stage,
            "partial": Jsonb(partial) if partial is not None else None,
            "live": live is not None, "eta_seconds": live["eta_seconds"] if live else None,
            "preview_changed": bool(live and live["preview_changed"]),
            "preview": Jsonb(preview) if preview is not None else None,
            "lease_seconds": self.lease_seconds,
        })
        if not rows:
            raise LeaseLost(f"job {job_id} is no longer held by {self.worker_id}")
        return bool(rows[0]["cancel_requested"])

    @_db_retry
    def finish(self, outcomes: Sequence[Outcome]) -> dict[UUID, str]:
        """Apply outcomes; return {job_id: new status} for the rows this worker still held."""
        if not outcomes:
            return {}
        rows = self._execute(FINISH_JOBS, {"worker_id": self.worker_id,
                                           "outcomes": Jsonb([o.to_json() for o in outcomes])}, durable=True)
        return {row["id"]: row["status"] for row in rows}

    @_db_retry
    def release(self, job_ids: Iterable[UUID]) -> set[UUID]:
        rows = self._execute(RELEASE_JOBS, {"worker_id": self.worker_id, "job_ids": list(job_ids)}, durable=True)
        return {row["id"] for row in rows}

    def rescue_expired(self) -> dict[UUID, str]:
        return {row["id"]: row["status"] for row in self._execute(RESCUE_EXPIRED, {})}

    # -- client side (CLI, tests, benchmarks) -------------------------------------------

    @_db_retry
    def enqueue(self, job_type: str, payload: dict[str, Any], *, priority: int = 0,
                user_id: UUID | str | None = None, run_at: datetime | None = None,
                max_attempts: int | None = None) -> UUID:
        rows = self._execute(ENQUEUE, {"job_type": job_type, "payload": Jsonb(payload),
                                       "priority": priority, "user_id": user_id, "run_at": run_at,
                                       "max_attempts": max_attempts})
        return rows[0]["id"]

    def enqueue_many(self, job_type: str, payloads: Sequence[dict[str, Any]], *, priority: int = 0,
                     user_id: UUID | str | None = None) -> None:
        self._execute(ENQUEUE_MANY, {"job_type": job_type, "payloads": Jsonb(list(payloads)),
                                     "priority": priority, "user_id": user_id})

    def request_cancel(self, job_id: UUID | str) -> str | None:
        rows = self._execute(REQUEST_CANCEL, {"id": job_id})
        return rows[0]["status"] if rows else None

    def get_job(self, job_id: UUID | str) -> dict[str, Any] | None:
        rows = self._execute(GET_JOB, {"id": job_id})
        return rows[0] if rows else None

    def recent_jobs(self, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
        return self._execute(RECENT_JOBS, {"limit": limit, "status": status})

    def read_dashboard(self, view: str, limit: int = 20) -> list[dict[str, Any]]:
        if view not in DASHBOARD_VIEWS:
            raise ValueError(f"{view!r} is not a dashboard view ({', '.join(DASHBOARD_VIEWS)})")
        return self._execute(READ_DASHBOARD.format(view=view), {"limit": limit})

    def list_job_types(self) -> list[dict[str, Any]]:
        return self._execute(LIST_JOB_TYPES, {})

    def upsert_job_type(self, name: str, queue: str | None = None, handler: str | None = None, *,
                        defaults: dict[str, Any] | None = None, max_attempts: int | None = None,
                        content_type: str | None = None, bucket: str | None = None,
                        file_extension: str | None = None, expected_seconds: int | None = None,
                        description: str | None = None, enabled: bool | None = None) -> dict[str, Any]:
        """Create a job type, or change only the given fields of an existing one (None: keep).
        Returns the row, with `created`. A new type needs a queue and a handler (ValueError)."""
        from psycopg.errors import NotNullViolation

        try:
            [row] = self._execute(UPSERT_JOB_TYPE, {
                "name": name, "queue": queue, "handler": handler,
                "defaults": Jsonb(defaults) if defaults is not None else None,
                "max_attempts": max_attempts, "content_type": content_type, "bucket": bucket,
                "file_extension": file_extension, "expected_seconds": expected_seconds,
                "description": description, "enabled": enabled,
            })
        except NotNullViolation as err:
            raise ValueError(f"job type {name!r} does not exist yet: a new one needs a queue and a handler") from err
        return row
