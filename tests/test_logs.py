"""The log (issue 11, item 1): JSON lines, plain single-line text, Rich only on a terminal, job
fields on every per-job record, secrets never written, library noise silenced."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
from platformdirs import RuntimeDirWarning

from worker import logs

REPO_ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    for key in logs.QUIET_ENV:  # configure() sets them only where unset; leave the process as it was
        monkeypatch.setenv(key, os.environ.get(key, ""))
        monkeypatch.delenv(key)
    root = logging.getLogger()
    level, handlers, show = root.level, list(root.handlers), warnings.showwarning
    yield
    warnings.showwarning = show
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("worker").setLevel(logging.NOTSET)


def job() -> SimpleNamespace:
    return SimpleNamespace(id=uuid4(), job_type="sdxl_image_fast", attempts=2)


def test_json_is_one_object_per_line_with_the_job_fields():
    out = io.StringIO()
    assert logs.configure("json", stream=out) == "json"
    claimed = job()
    log = logging.getLogger("worker.loop")
    log.info("job %s claimed", claimed.id, extra=logs.job_extra(claimed, "gpu-1"))
    try:
        {}["missing_key"]
    except KeyError:
        log.exception("job failed", extra=logs.job_extra(claimed, "gpu-1", code="GENERATION_FAILED", seconds=1.5))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "worker.loop", f"job {claimed.id} claimed")
    assert (first["job_id"], first["job_type"], first["attempt"], first["worker_id"]) == \
        (str(claimed.id), "sdxl_image_fast", 2, "gpu-1")
    assert second["level"] == "ERROR" and second["code"] == "GENERATION_FAILED" and second["seconds"] == 1.5
    assert "Traceback" in second["exc_info"] and "KeyError: 'missing_key'" in second["exc_info"]


def test_text_is_plain_single_lines_with_iso_times_when_not_a_terminal():
    out = io.StringIO()
    assert logs.configure(stream=out) == "text"  # auto, and the stream is no terminal
    claimed = job()
    logging.getLogger("worker.loop").warning("job %s failed", claimed.id,
                                             extra=logs.job_extra(claimed, "gpu-1", code="OOM_ERROR"))
    [line] = out.getvalue().splitlines()
    stamp, level, name, *_ = line.split()
    assert datetime.fromisoformat(stamp).tzinfo is not None
    assert (level, name) == ("WARNING", "worker.loop:")
    assert line.endswith(f"job_id={claimed.id} job_type=sdxl_image_fast attempt=2 worker_id=gpu-1 code=OOM_ERROR")
    assert not any(ch in line for ch in "│╭─"), "no Rich boxes or wrapping"


def test_rich_only_on_a_terminal_and_the_format_is_checked():
    assert logs.configure(stream=Terminal()) == "rich"
    assert logs.configure("text", stream=Terminal()) == "text"
    with pytest.raises(ValueError, match="OURVIDZ_LOG_FORMAT must be one of auto, rich, text, json"):
        logs.configure("xml", stream=io.StringIO())
    root = logging.getLogger()
    assert sum(h.get_name() == "ourvidz" for h in root.handlers) == 1, "configuring again replaces, never stacks"


def test_secrets_and_library_noise_stay_out():
    out = io.StringIO()
    logs.configure("text", stream=out)
    logs.hide("hunter2-password")
    logging.getLogger("psycopg.pool").warning("error connecting: postgresql://u:hunter2-password@db/x")
    logging.getLogger("httpx").info("HTTP Request: POST https://x.supabase.co/storage/v1/object 200 OK")
    with warnings.catch_warnings():
        logs.configure("text", stream=out)  # inside the test's own warning filters
        warnings.warn("XDG_RUNTIME_DIR is not set", RuntimeDirWarning, stacklevel=1)
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    text = out.getvalue()
    assert "hunter2-password" not in text and "postgresql://u:***@db/x" in text
    assert "HTTP Request" not in text and "XDG_RUNTIME_DIR" not in text
    [warned] = [line for line in text.splitlines() if "a warning of our own" in line]
    assert " WARNING py.warnings: UserWarning: a warning of our own (" in warned, "one record in the log's format"
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_a_worker_process_logs_json_lines(tmp_path, database_url, queue):
    job_id = queue.enqueue("simulate", {"config": {"steps": 1, "step_seconds": 0}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "SUPABASE_"))}
    env.update(DATABASE_URL=database_url, OURVIDZ_HOME=str(tmp_path), OURVIDZ_LOG_FORMAT="json",
               PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "worker.cli", "run", "--max-jobs", "1"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r.get("job_id") == str(job_id) for r in records), "the job's records carry its id"
