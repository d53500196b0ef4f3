"""What a hostile signed-in user can insert, and what it does to the fleet (issue 9).

Users act through the PostgREST path (`Api`: role `authenticated` + JWT claims, as in
tests/test_security.py); workers run in threads of the test process on a real Postgres.
"""

from __future__ import annotations

import json
import select
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import WorkerThread, wait_for, wait_status
from tests.hostile_support import CountingLoads, SlowPrepareHandler, StubbornHandler
from tests.test_security import Api, _new_user
from worker import db
from worker.config import Settings
from worker.handlers.chat import ChatHandler
from worker.handlers.sdxl import SdxlHandler
from worker.handlers.simulate import SimulateHandler
from worker.handlers.wan import WanHandler
from worker.jobs import ErrorCode
from worker.queue import JobQueue

TERMINAL = ("completed", "failed", "canceled")

POISON_PAYLOADS = {
    "an array": "[1, 2, 3]",
    "a string": '"x"',
    "a number": "42",
    "null": "null",
    "1,000 levels of nesting": '{"a": ' + "[" * 1000 + "]" * 1000 + "}",
    "a 4,401-digit number": '{"seed": 1e4400}',
}


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    client = Api(database_url)
    yield client
    client.close()


@pytest.fixture
def alice(sql: psycopg.Connection[dict[str, Any]]) -> uuid.UUID:
    return _new_user(sql, f"alice-{uuid.uuid4().hex[:6]}@example.com")


def insert_raw(sql: psycopg.Connection[dict[str, Any]], payloads: list[str], job_type: str = "simulate") -> list[Any]:
    """Rows written before the insert checks existed: the worker must survive them too."""
    sql.execute("alter table public.jobs disable trigger jobs_aa_check_payload")
    try:
        return [sql.execute("insert into public.jobs (job_type, payload) values (%s, %s::jsonb) returning id",
                            (job_type, p)).fetchone()["id"] for p in payloads]
    finally:
        sql.execute("alter table public.jobs enable trigger jobs_aa_check_payload")


# --- refused at insert ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(POISON_PAYLOADS))
def test_what_can_never_be_a_payload_is_refused_at_insert(kind: str, api: Api, alice: uuid.UUID,
                                                           sql: psycopg.Connection[dict[str, Any]]) -> None:
    for attempt in (lambda: api.as_user(alice, "insert into public.jobs (job_type, payload) values "
                                               "('sdxl_image_fast', %s::jsonb)", (POISON_PAYLOADS[kind],)),
                    lambda: sql.execute("insert into public.jobs (job_type, payload) values ('simulate', %s::jsonb)",
                                        (POISON_PAYLOADS[kind],))):
        with pytest.raises(psycopg.Error) as caught:
            attempt()
        assert caught.value.sqlstate == "22023", caught.value
        assert str(caught.value).startswith("The payload"), caught.value
    assert sql.execute("select count(*) as n from public.jobs").fetchone()["n"] == 0


# --- poison rows in the table ----------------------------------------------------------------------


def test_poison_rows_fail_alone_and_the_worker_carries_on(start_worker: Callable[..., WorkerThread],
                                                          queue: JobQueue,
                                                          sql: psycopg.Connection[dict[str, Any]]) -> None:
    good = '{"prompt": "fine", "config": {"steps": 1, "step_seconds": 0}}'
    payloads = [p for poison in POISON_PAYLOADS.values() for p in (good, poison)] + [good]
    ids = insert_raw(sql, payloads)
    worker = start_worker({"simulate": SimulateHandler()}, concurrency=4)
    rows = [wait_status(queue, job_id, *TERMINAL, timeout=30) for job_id in ids]
    assert worker.thread.is_alive()
    for payload, row in zip(payloads, rows, strict=True):
        if payload == good:
            assert row["status"] == "completed", row["error"]
        else:
            assert row["status"] == "failed" and row["error"]["code"] == "INVALID_INPUT", row
    messages = [r["error"]["message"] for r in rows if r["error"]]
    assert "payload must be a JSON object, not an array" in messages
    assert "payload must be a JSON object, not null" in messages
    assert any(m.startswith("payload could not be read: ValueError: Exceeds the limit") for m in messages), messages
    assert any("RecursionError" in m for m in messages) or all("nesting" not in m for m in messages)
    worker.stop()


# --- limits as data, checked before any model work --------------------------------------------------


@pytest.fixture
def validating_handlers(tmp_path: Path) -> dict[str, CountingLoads]:
    """The real handlers' validation (prepare) with a model that would fail to load: a load is counted."""
    settings = Settings(home=tmp_path / "home", reference_allow_http=True)
    missing = str(tmp_path / "no-such-model")
    return {"sdxl": CountingLoads(SdxlHandler(settings, model=missing)),
            "wan": CountingLoads(WanHandler(settings, model=missing, vace_model="", i2v_model="")),
            "chat": CountingLoads(ChatHandler(settings, model=missing))}


INVALID_JOBS = [
    ("sdxl_image_fast", {"prompt": "a cat", "config": "x"}, "config: must be a JSON object, not a string"),
    ("sdxl_image_fast", {"prompt": "a cat", "config": [1]}, "config: must be a JSON object, not an array"),
    ("sdxl_image_fast", {"prompt": "a cat", "metadata": 7}, "metadata: must be a JSON object"),
    ("sdxl_image_fast", {"prompt": "a cat", "config": {"seed": False}},
     "config.seed: Input should be a valid integer"),
    ("sdxl_image_fast", {"prompt": "a cat", "config": {"steps": "30"}},
     "config.steps: Input should be a valid integer"),
    ("sdxl_image_fast", {"prompt": "a cat", "config": {"num_images": 4}}, "num_images"),
    ("sdxl_image_fast", {"prompt": "a cat", "metadata": {"reference_image_url": 5}},
     "reference_image_url must be a string"),
    ("video_fast", {"prompt": "a cat", "config": {"width": 1280, "height": 1280}},
     "width: must be between 256 and 1024 (got 1280)"),
    ("video_fast", {"prompt": "a cat", "config": {"frame_num": 121}}, "frame_num: must be between 16 and 83 (got 121)"),
    ("video_fast", {"prompt": "a cat", "config": {"frame_num": 1}}, "frame_num"),
    ("video_fast", {"prompt": "a cat", "config": {"image": 12}}, "config.image: Input should be a valid string"),
    ("image_fast", {"prompt": "a cat", "config": {"frame_num": 17}}, "frame_num: must be one of 1 (got 17)"),
    ("chat_conversation", {"message": "hi", "temperature": 5}, "temperature"),
    ("chat_conversation", {"message": "hi", "max_tokens": 100000}, "max_tokens"),
    ("chat_roleplay", {"message": "hi", "scenario": 42}, "scenario: Input should be a valid string"),
]


def test_invalid_jobs_fail_naming_the_field_and_never_load_a_model(
        start_worker: Callable[..., WorkerThread], queue: JobQueue,
        validating_handlers: dict[str, CountingLoads]) -> None:
    ids = [queue.enqueue(job_type, payload) for job_type, payload, _ in INVALID_JOBS]
    worker = start_worker(validating_handlers, concurrency=2)
    for job_id, (job_type, _, expected) in zip(ids, INVALID_JOBS, strict=True):
        row = wait_status(queue, job_id, *TERMINAL)
        assert row["status"] == "failed", (job_type, row)
        assert row["error"]["code"] == "INVALID_INPUT", row["error"]
        assert expected in row["error"]["message"], (expected, row["error"]["message"])
    assert {name: h.loads for name, h in validating_handlers.items()} == {"sdxl": 0, "wan": 0, "chat": 0}
    valid = queue.enqueue("sdxl_image_fast", {"prompt": "a cat", "config": {"steps": 20}})
    assert wait_status(queue, valid, *TERMINAL)["status"] == "completed"
    assert validating_handlers["sdxl"].loads == 1  # the counter counts
    worker.stop()


def test_operators_change_limits_with_an_update_and_frontends_read_them(
        start_worker: Callable[..., WorkerThread], queue: JobQueue, api: Api, alice: uuid.UUID,
        sql: psycopg.Connection[dict[str, Any]], validating_handlers: dict[str, CountingLoads]) -> None:
    read = api.as_user(alice, "select limits, max_run_seconds from public.job_types where name = 'sdxl_image_fast'")
    assert read[0]["limits"]["steps"] == {"min": 10, "max": 50} and read[0]["max_run_seconds"] == 150
    worker = start_worker(validating_handlers)
    first = queue.enqueue("sdxl_image_fast", {"prompt": "a cat", "config": {"steps": 40}})
    assert wait_status(queue, first, *TERMINAL)["status"] == "completed"
    sql.execute("update public.job_types set limits = jsonb_set(limits, '{steps,max}', '30')"
                " where name = 'sdxl_image_fast'")
    wait_for(lambda: worker.worker._served["sdxl_image_fast"].limits["steps"]["max"] == 30)  # NOTIFY ourvidz_types
    second = queue.enqueue("sdxl_image_fast", {"prompt": "a cat", "config": {"steps": 40}})
    row = wait_status(queue, second, *TERMINAL)
    assert row["status"] == "failed" and "steps: must be between 10 and 30 (got 40)" in row["error"]["message"]
    worker.stop()


# --- who may submit what, at which priority -------------------------------------------------------


def test_simulate_is_not_for_users(api: Api, alice: uuid.UUID, queue: JobQueue) -> None:
    with pytest.raises(psycopg.Error) as caught:
        api.as_user(alice, "insert into public.jobs (job_type, payload) values ('simulate', '{}')")
    assert caught.value.sqlstate == "OVTYP"
    for rows in (api.anon("select name from public.job_types"),
                 api.as_user(alice, "select name from public.job_types")):
        names = {r["name"] for r in rows}
        assert "simulate" not in names and "sdxl_image_fast" in names
    assert queue.get_job(queue.enqueue("simulate", {}))["status"] == "queued"  # the service keeps it


def test_users_cannot_jump_the_queue(api: Api, alice: uuid.UUID, queue: JobQueue) -> None:
    insert = "insert into public.jobs (job_type, payload, priority) values ('sdxl_image_fast', '{}', %s) returning *"
    for priority in (1, 10, 100):
        with pytest.raises(psycopg.Error) as caught:
            api.as_user(alice, insert, (priority,))
        assert caught.value.sqlstate == "OVQTA" and "the range is -100 to 0" in str(caught.value)
    assert [api.as_user(alice, insert, (p,))[0]["priority"] for p in (0, -5)] == [0, -5]
    assert queue.get_job(queue.enqueue("simulate", {}, priority=100))["priority"] == 100


def test_text_quotas_cover_every_free_text_field(api: Api, alice: uuid.UUID) -> None:
    long_image_text, long_chat_text = "x" * 1001, "x" * 32001
    cases = [
        ("sdxl_image_fast", {"prompt": "a cat", "metadata": {"note": long_image_text}}),
        ("chat_roleplay", {"message": "hi", "character": {"name": "Ann", "persona": long_chat_text}}),
        ("chat_roleplay", {"message": "hi", "scenario": long_chat_text}),
        ("chat_roleplay", {"message": "hi", "conversation_history": [{"sender": "user", "content": long_chat_text}]}),
    ]
    for job_type, payload in cases:
        with pytest.raises(psycopg.Error) as caught:
            api.as_user(alice, "insert into public.jobs (job_type, payload) values (%s, %s)",
                        (job_type, Jsonb(payload)))
        assert caught.value.sqlstate == "OVQTA" and "too long" in str(caught.value), (job_type, caught.value)


# --- time limits ------------------------------------------------------------------------------------


def test_a_job_past_its_time_limit_ends_timeout_and_frees_its_slot(
        start_worker: Callable[..., WorkerThread], queue: JobQueue,
        sql: psycopg.Connection[dict[str, Any]]) -> None:
    sql.execute("update public.job_types set max_run_seconds = 1 where name = 'simulate'")
    slow = queue.enqueue("simulate", {"config": {"steps": 100, "step_seconds": 0.05}}, max_attempts=2)
    worker = start_worker({"simulate": SimulateHandler()}, concurrency=1)
    row = wait_status(queue, slow, "failed", timeout=30)
    assert row["error"]["code"] == "TIMEOUT_ERROR" and "may run for 1s" in row["error"]["message"]
    assert [e["code"] for e in row["errors"]] == ["TIMEOUT_ERROR", "TIMEOUT_ERROR"] and row["attempts"] == 2
    quick = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})
    assert wait_status(queue, quick, *TERMINAL)["status"] == "completed"
    assert worker.thread.is_alive()
    worker.stop()


def test_a_handler_that_will_not_stop_is_given_back_and_its_worker_exits(
        start_worker: Callable[..., WorkerThread], queue: JobQueue,
        sql: psycopg.Connection[dict[str, Any]]) -> None:
    sql.execute("insert into public.job_types (name, queue, handler, max_run_seconds)"
                " values ('stubborn', 'test', 'stubborn', 1)")
    job_id = queue.enqueue("stubborn", {"stubborn": True})
    worker = start_worker({"stubborn": StubbornHandler()}, timeout_grace=1.0)
    worker.thread.join(30)
    assert not worker.thread.is_alive(), "the worker did not stop itself"
    assert worker.worker.exit_reason and "did not stop within 1s of its time limit" in worker.worker.exit_reason
    row = queue.get_job(job_id)
    assert row["status"] == "queued" and row["attempts"] == 1
    assert [e["code"] for e in row["errors"]] == ["TIMEOUT_ERROR"]


# --- a slow reference delays only its own job ---------------------------------------------------------


def test_a_slow_reference_delays_only_its_own_job(start_worker: Callable[..., WorkerThread], queue: JobQueue,
                                                  sql: psycopg.Connection[dict[str, Any]]) -> None:
    sql.execute("insert into public.job_types (name, queue, handler) values ('fetching', 'test', 'fetching')")
    handler = SlowPrepareHandler()
    slow = queue.enqueue("fetching", {"name": "slow", "fetch_seconds": 3})
    worker = start_worker({"fetching": handler}, concurrency=1, prepare_slots=2)
    wait_for(lambda: queue.get_job(slow)["status"] == "processing")
    quick = queue.enqueue("fetching", {"name": "quick"})
    quick_row = wait_status(queue, quick, "completed", timeout=10)
    slow_row = wait_status(queue, slow, "completed", timeout=10)
    assert handler.finished == ["quick", "slow"]
    assert quick_row["finished_at"] < slow_row["finished_at"]
    assert (quick_row["finished_at"] - quick_row["created_at"]).total_seconds() < 2.5
    worker.stop()


# --- no wake-up storm -------------------------------------------------------------------------------


def _notifications(conn: psycopg.Connection[Any], wait: float) -> list[str]:
    seen, deadline = [], time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        select.select([conn.fileno()], [], [], left)
        seen += [f"{n.channel}:{n.payload}" for n in conn.notifies(timeout=0.01)]
    return seen


def test_noop_updates_send_no_notify(database_url: str, api: Api, alice: uuid.UUID, queue: JobQueue) -> None:
    job_id = api.as_user(alice, "insert into public.jobs (job_type, payload) values ('sdxl_image_fast', '{}')"
                                " returning id")[0]["id"]
    with db.connect(database_url) as listener:
        listener.execute("LISTEN ourvidz_jobs")
        listener.execute("LISTEN ourvidz_cancel")
        for _ in range(5):
            api.as_user(alice, "update public.jobs set cancel_requested = false where id = %s", (job_id,))
        assert _notifications(listener, 0.5) == []
        worker_side = JobQueue(queue.pool, worker_id="w-notify")
        worker_side.claim(["sdxl_image_fast"], 1)
        api.as_user(alice, "update public.jobs set cancel_requested = true where id = %s", (job_id,))
        assert _notifications(listener, 1.0) == [f"ourvidz_cancel:{job_id}"]


# --- the documented codes ------------------------------------------------------------------------------


def test_every_error_code_the_worker_writes_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in readme]
    assert missing == []


def test_job_limits_are_json_a_frontend_can_use(sql: psycopg.Connection[dict[str, Any]]) -> None:
    rows = sql.execute("select name, limits from public.job_types where users_may_submit").fetchall()
    assert rows and all(r["limits"] for r in rows), [r["name"] for r in rows if not r["limits"]]
    for row in rows:
        for field, spec in row["limits"].items():
            assert set(spec) <= {"min", "max", "in", "max_length"}, (row["name"], field, spec)
    json.dumps(rows, default=str)
