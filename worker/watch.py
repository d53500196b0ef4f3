"""`ourvidz-worker jobs --watch ID` through Supabase Realtime, as a frontend would watch.

Used when SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are set; otherwise the CLI follows the row in
the database directly (worker.demo.follow). One private channel `job:<id>` carries both sources:
the Broadcast the jobs_broadcast trigger sends for owned jobs, and Postgres Changes, which also
cover service jobs (no owner, no broadcast). The row is re-read on every (re)subscribe and every
`reread_seconds`, so a change sent while disconnected, or a Realtime outage, is never missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from worker.config import Settings

TERMINAL = frozenset({"completed", "failed", "canceled"})
BROADCAST_EVENT = "job"

Row = dict[str, Any]
Source = Literal["broadcast", "postgres_changes", "read"]


def watch_backend(settings: Settings) -> Literal["supabase", "database"]:
    """Supabase Realtime when the project URL and a key that may read every job are set."""
    return "supabase" if settings.supabase_url and settings.supabase_service_role_key else "database"


class JobWatch:
    """The newest version of one job row, merged from sources that may repeat or interleave."""

    def __init__(self, job_id: UUID, on_change: Callable[[Row, Source], None] | None = None) -> None:
        self.job_id = str(job_id)
        self.row: Row | None = None
        self.done = asyncio.Event()
        self._on_change = on_change

    def offer(self, update: Row | None, source: Source) -> None:
        if not update or str(update.get("id")) != self.job_id or self.done.is_set():
            return
        if self.row is not None and not _newer(update, self.row):
            # An older or repeated version may still carry columns a broadcast leaves out.
            self.row = {**update, **self.row}
            return
        self.row = {**(self.row or {}), **update}
        if self._on_change:
            self._on_change(self.row, source)
        if self.row.get("status") in TERMINAL:
            self.done.set()


def _newer(update: Row, current: Row) -> bool:
    if current.get("status") in TERMINAL:
        return False
    if not update.get("updated_at") or not current.get("updated_at"):
        return True
    return _timestamp(update["updated_at"]) > _timestamp(current["updated_at"])


def _timestamp(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


async def watch_supabase(settings: Settings, job_id: UUID,
                         on_change: Callable[[Row, Source], None] | None = None,
                         timeout: float = 3600.0, reread_seconds: float = 5.0) -> Row:
    """Follow `job_id` until it ends; return the terminal row. TimeoutError after `timeout`."""
    from supabase import acreate_client

    if not settings.supabase_url or not settings.supabase_service_role_key:
        raise ValueError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are required")
    client = await acreate_client(settings.supabase_url, settings.supabase_service_role_key.get_secret_value())
    watch = JobWatch(job_id, on_change)
    tasks: set[asyncio.Task[None]] = set()

    async def reread() -> None:
        response = await client.table("jobs").select("*").eq("id", str(job_id)).limit(1).execute()
        if not response.data:
            raise LookupError(f"job {job_id} not found")
        watch.offer(response.data[0], "read")

    def on_state(state: str, _error: Exception | None) -> None:
        if state == "SUBSCRIBED":  # RealtimeSubscribeStates is a str enum
            task = asyncio.create_task(reread())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    channel = client.channel(f"job:{job_id}", {"config": {
        "private": True, "broadcast": {"ack": False, "self": False}, "presence": {"key": "", "enabled": False},
    }})
    channel.on_broadcast(BROADCAST_EVENT, lambda message: watch.offer(message["payload"], "broadcast"))
    channel.on_postgres_changes("UPDATE", lambda change: watch.offer(change["data"].get("record"), "postgres_changes"),
                                schema="public", table="jobs", filter=f"id=eq.{job_id}")
    try:
        await channel.subscribe(on_state)
        await reread()
        async with asyncio.timeout(timeout):
            while not watch.done.is_set():
                try:
                    await asyncio.wait_for(watch.done.wait(), reread_seconds)
                except TimeoutError:
                    await reread()
    finally:
        for task in tasks:
            task.cancel()
        await client.remove_all_channels()
    assert watch.row is not None
    return watch.row
