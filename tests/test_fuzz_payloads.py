"""Property-based fuzzing of what users can put in a row (issue 9): thousands of generated payloads
across every job type go through a real worker on a real Postgres. Each is refused at insert
(SQLSTATE 22023, or 22P05 for a NUL, which jsonb cannot hold)
or ends in a terminal state with a documented code; the worker never exits.

The handlers are the real ones' validation (`prepare`: pydantic models, the type's limits,
reference checks) in front of a run that returns at once, so the budget goes to the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from tests.conftest import WorkerThread, wait_for
from tests.hostile_support import CountingLoads
from worker.config import Settings
from worker.handlers.chat import ChatHandler
from worker.handlers.sdxl import SdxlHandler
from worker.handlers.simulate import SimulateHandler
from worker.handlers.wan import WanHandler
from worker.jobs import ErrorCode

JOB_TYPES = ["sdxl_image_fast", "sdxl_image_high", "image_fast", "video_fast", "video7b_high_enhanced",
             "chat_conversation", "chat_roleplay", "chat_enhance", "chat_generate", "simulate"]
FIELDS = ["width", "height", "steps", "guidance_scale", "seed", "num_images", "frame_num", "fps", "image",
          "first_frame", "last_frame", "reference_type", "reference_strength", "max_tokens", "temperature", "top_p",
          "history_limit", "min_tokens", "step_seconds", "size", "sample_steps", "enhance_prompt", "target"]
# references that never leave the machine: wrong schemes, private hosts, other users' folders
REFERENCES = ["", "not a url", "ftp://example.com/x.png", "http://127.0.0.1:1/x.png", "https://10.0.0.1/x.png",
              "data:image/png;base64,AAAA", "00000000-0000-0000-0000-000000000000/x.png", "../../etc/passwd"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 5000),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),  # what JSON.stringify can send
                    st.text(max_size=20), st.sampled_from(REFERENCES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                             inner, max_size=3),
                      max_leaves=6)
configs = st.one_of(st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, values)), values)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.one_of(st.text(max_size=30), values)}), max_size=3)
payloads = st.one_of(
    st.fixed_dictionaries({}, optional={
        "prompt": st.one_of(st.text(max_size=40), values), "config": configs,
        "metadata": st.one_of(st.fixed_dictionaries({}, optional=dict.fromkeys(
            ["reference_image_url", "start_reference_url", "seed", "num_images", "note"], values)), values),
        "message": st.one_of(st.text(max_size=40), values), "messages": st.one_of(messages, values),
        "character": values, "scenario": values, "conversation_history": values,
        "max_tokens": values, "temperature": values, "negative_prompt": values,
    }),
    values,  # not even an object
)


def test_generated_payloads_fail_alone_with_documented_codes(
        start_worker: Callable[..., WorkerThread], sql: psycopg.Connection[dict[str, Any]], tmp_path: Path) -> None:
    settings_ = Settings(home=tmp_path / "home")
    missing = str(tmp_path / "no-such-model")
    handlers = {"sdxl": CountingLoads(SdxlHandler(settings_, model=missing)),
                "wan": CountingLoads(WanHandler(settings_, model=missing, vace_model="", i2v_model="")),
                "chat": CountingLoads(ChatHandler(settings_, model=missing)),
                "simulate": CountingLoads(SimulateHandler())}
    worker = start_worker(handlers, concurrency=8, retry_base_seconds=0.01, retry_max_seconds=0.05)
    inserted: list[Any] = []
    refused: list[str] = []

    @settings(max_examples=3000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(st.sampled_from(JOB_TYPES), payloads)
    def insert(job_type: str, payload: Any) -> None:
        try:
            inserted.append(sql.execute("insert into public.jobs (job_type, payload, max_attempts)"
                                        " values (%s, %s, 1) returning id",
                                        (job_type, Jsonb(payload))).fetchone()["id"])
        except psycopg.Error as err:
            # only what can never be a payload is refused: ours (22023) or Postgres's own (22P05: a NUL in text)
            assert err.sqlstate in ("22023", "22P05"), err
            refused.append(str(err).splitlines()[0])

    insert()
    assert len(inserted) + len(refused) >= 3000

    def settled() -> bool:
        row = sql.execute("select count(*) filter (where status in ('queued', 'processing')) as open"
                          " from public.jobs").fetchone()
        return row["open"] == 0

    wait_for(settled, timeout=240, interval=0.5)
    assert worker.thread.is_alive()
    rows = sql.execute("select status, error->>'code' as code, count(*) as n from public.jobs"
                       " group by 1, 2").fetchall()
    documented = {code.value for code in ErrorCode}
    for row in rows:
        assert row["status"] in ("completed", "failed"), row
        assert row["status"] == "completed" or row["code"] in documented, row
    assert {r["status"] for r in rows} == {"completed", "failed"}  # the generator reaches both
    print(f"{len(refused)} refused at insert;", ", ".join(f"{r['n']} {r['status']} {r['code'] or ''}".strip()
                                                       for r in rows))
    worker.stop()
