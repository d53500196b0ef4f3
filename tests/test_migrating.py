"""docs/migrating.md holds: every old job type and error code of the seeds is mapped, to names that
exist (job_types rows, worker.jobs.ErrorCode); the alias rows are copies of their presets, and an
old job type runs as its preset; the RunPod section names real settings and a valid start command."""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import typer.main

from tests.conftest import wait_status
from worker.cli import app
from worker.config import REPO_ROOT, Settings
from worker.handlers.base import JobContext
from worker.jobs import ErrorCode, Job
from worker.queue import JobQueue

DOC = REPO_ROOT / "docs" / "migrating.md"
# What the seeds name (../shared/seeds): seed 000's job types, and the error codes of seeds 000, 001, 004.
OLD_TYPES = {"sdxl_generate", "chat_conversation", "chat_enhance", "chat_unrestricted", "wan_video", "wan_image",
             "chat_roleplay"}
OLD_CODES = {"OOM_ERROR", "MODEL_LOAD_ERROR", "INVALID_PROMPT", "WORKER_UNAVAILABLE", "TIMEOUT_ERROR",
             "VRAM_OVERFLOW", "MODEL_LOAD_FAILED", "GENERATION_FAILED", "NETWORK_ERROR", "DATABASE_ERROR",
             "SYSTEM_PROMPT_MISSING", "ModelNotAvailable", "OutOfMemoryError", "RuntimeError", "ConnectionError",
             "Exception"}


def section(title: str) -> str:
    return DOC.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(title: str) -> list[list[str]]:
    """The rows of the first table of a section, cells stripped."""
    rows = [line for line in section(title).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def names(cell: str) -> list[str]:
    return re.findall(r"`([A-Za-z0-9_]+)`", cell)


def test_every_old_job_type_maps_to_a_job_type(sql: psycopg.Connection[dict[str, Any]]) -> None:
    types = {r["name"]: r for r in sql.execute("select * from public.job_types").fetchall()}
    rows = table("Job types")
    mapped = {old for row in rows for old in names(row[0])}
    assert mapped >= OLD_TYPES, OLD_TYPES - mapped
    for old, _where, new, alias in rows:
        targets = [n for n in names(new) if n != "model"] or names(old)
        assert targets and all(t in types for t in targets), f"{old} -> {new}: not job types"
        if alias == "yes":  # a copy of its preset, marked with alias_of
            [row_name] = names(old)
            [target] = names(new)[:1]
            alias_row, preset = dict(types[row_name]), dict(types[target])
            assert alias_row["defaults"] == {**preset["defaults"], "alias_of": target}
            differ = {k for k in preset if alias_row[k] != preset[k]}
            assert differ <= {"name", "defaults", "description", "created_at", "updated_at"}, (row_name, differ)


def test_every_old_error_code_maps_to_a_worker_code() -> None:
    rows = table("Error codes")
    mapped = {old for row in rows for old in names(row[0])}
    assert mapped >= OLD_CODES, OLD_CODES - mapped
    codes = {c.value for c in ErrorCode}
    for old, _where, new in rows:
        target = [n for n in names(new) if re.fullmatch(r"[A-Z]+(?:_[A-Z]+)+", n)]  # not SQLSTATEs like OVQTA
        assert set(target) <= codes, f"{old} -> {new}"
        assert target or new.startswith("—"), f"{old}: no new code and no explanation"
    documented = {n for row in rows for n in names(row[2])}
    assert codes <= documented, f"codes of the worker the table does not name: {codes - documented}"


class Recorder:
    """Stands in for the SDXL handler: records the job it is given."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.ran = threading.Event()

    def load(self) -> None:
        pass

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        self.jobs.append(job)
        self.ran.set()
        return {"assets": []}


def test_an_old_job_type_runs_as_its_preset(queue: JobQueue, start_worker: Any) -> None:
    recorder = Recorder()
    start_worker({"sdxl": recorder})
    # Seed 000's SDXL payload, under its old job type.
    job_id = queue.enqueue("sdxl_generate", {
        "prompt": "a lighthouse at dusk",
        "config": {"width": 1024, "height": 1024, "steps": 30, "guidance_scale": 7.5, "seed": 42},
        "metadata": {"nsfw_optimization": True, "anatomical_accuracy": True},
    })
    assert wait_status(queue, job_id, "completed", "failed")["status"] == "completed"
    [job] = recorder.jobs
    assert job.type_info is not None and (job.type_info.handler, job.type_info.bucket) == ("sdxl", "sdxl_image_high")
    assert job.config["steps"] == 30 and job.config["seed"] == 42  # the payload's config wins
    assert job.config["num_images"] == 1 and job.config["alias_of"] == "sdxl_image_high"  # the preset's defaults


def test_the_runpod_section_names_real_settings_and_a_valid_start_command() -> None:
    text = section("RunPod")
    fields = Settings.model_fields
    env_names = {f"OURVIDZ_{name.upper()}" for name in fields}
    for info in fields.values():
        choices = getattr(info.validation_alias, "choices", None) or []
        env_names |= {c for c in choices if isinstance(c, str)}
    variables = {row[0].strip("`") for row in table("RunPod") if row[0].startswith("`")}
    assert {"DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "OURVIDZ_STORAGE_BACKEND"} <= variables
    assert variables - {"HF_HOME"} <= env_names, (variables - {"HF_HOME"}) - env_names
    [start] = re.findall(r"\*\*Start command\*\*: `([^`]+)`", text)
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    with command.make_context("run", start.split()) as ctx:
        assert ctx.params["gpus"] == "all" and ctx.params["health_port"] == 8080
    assert "deploy/Dockerfile" in text and "/readyz" in text
    assert "docs/migrating.md" in (REPO_ROOT / "README.md").read_text()
