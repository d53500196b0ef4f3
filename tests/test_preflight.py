"""Check before claiming (worker/preflight.py): what `ourvidz-worker run` refuses, in one sentence, and
what it starts with faulted instead.

Storage goes through the real supabase-py client against the stand-in of tests/storage_standin.py,
which fakes the network edge of Supabase Storage (here: a refused key). Every database is a real
Postgres (tests/conftest.py). No GPU is needed: the CUDA checks run where there is none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import PostgresServer
from tests.storage_standin import KEY, FakeStorageAPI, fake_api_fixture, supabase_storage  # noqa: F401
from worker import db
from worker.config import Settings
from worker.handlers.base import Handler
from worker.handlers.chat import ChatHandler
from worker.handlers.sdxl import SdxlHandler
from worker.handlers.simulate import SimulateHandler
from worker.preflight import PreflightError, check_gpus, preflight, source_problem
from worker.storage import LocalStorage, SupabaseStorage
from worker.supervisor import GpuError

REPO_ROOT = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def handlers(**extra: Handler) -> dict[str, Handler]:
    return {"simulate": SimulateHandler(), **extra}


def worker_settings(settings: Settings, *queues: str) -> Settings:
    return settings.model_copy(update={"queues": list(queues)})


# --- storage -----------------------------------------------------------------------------


def test_refused_storage_key_refuses_a_worker_with_nothing_else_to_serve(
        settings: Settings, database_url: str, fake_api: FakeStorageAPI) -> None:
    fake_api.public["simulate"] = False
    storage = supabase_storage(fake_api, key="a-key-from-another-project")
    with pytest.raises(PreflightError) as caught:
        preflight(worker_settings(settings, "demo"), handlers(), database_url, storage)
    assert caught.value.code == 2
    message = caught.value.message
    assert "refused the service key" in message and "SUPABASE_SERVICE_ROLE_KEY" in message
    assert "\n" not in message and "a-key-from-another-project" not in message


def test_refused_storage_key_still_serves_what_publishes_nothing(
        settings: Settings, database_url: str, fake_api: FakeStorageAPI) -> None:
    storage = supabase_storage(fake_api, key="wrong")
    chat = ChatHandler(settings, model=str(_model_folder(settings.home_dir / "chat")), device="cpu")
    used, faults = preflight(worker_settings(settings, "demo", "chat"), handlers(chat=chat), database_url, storage)
    assert used is storage
    assert set(faults) == {"storage"} and "refused the service key" in faults["storage"]


def test_storage_that_cannot_be_reached_yet_is_a_fault_not_a_refusal(settings: Settings, database_url: str) -> None:
    storage = SupabaseStorage("http://127.0.0.1:9", KEY, attempts=1, timeout=2.0, public_buckets=[])
    _, faults = preflight(worker_settings(settings, "demo"), handlers(), database_url, storage)
    assert list(faults) == ["storage"] and "cannot be reached" in faults["storage"]


def test_accepted_key_and_local_storage_pass(settings: Settings, database_url: str, fake_api: FakeStorageAPI,
                                             tmp_path: Path) -> None:
    fake_api.public["simulate"] = False
    for storage in (supabase_storage(fake_api), LocalStorage(tmp_path / "storage")):
        assert preflight(worker_settings(settings, "demo"), handlers(), database_url, storage)[1] == {}


def test_a_key_treated_as_anonymous_sees_no_bucket(settings: Settings, database_url: str,
                                                   fake_api: FakeStorageAPI) -> None:
    # the anon key is a valid JWT: Storage lists the buckets it may see, which is none
    with pytest.raises(PreflightError, match="shows this key no bucket"):
        preflight(worker_settings(settings, "demo"), handlers(), database_url, supabase_storage(fake_api))


# --- models and devices --------------------------------------------------------------------


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def test_missing_model_path_faults_that_handler_only(settings: Settings, database_url: str,
                                                     tmp_path: Path) -> None:
    sdxl = SdxlHandler(settings, model=str(tmp_path / "no-such-model"))
    storage = LocalStorage(tmp_path / "storage")
    _, faults = preflight(worker_settings(settings, "demo", "sdxl"), handlers(sdxl=sdxl), database_url, storage)
    assert list(faults) == ["handler:sdxl"]
    missing = tmp_path / "no-such-model"
    assert faults["handler:sdxl"] == f"sdxl model OURVIDZ_SDXL_MODEL={missing}: no such file or folder"

    with pytest.raises(PreflightError) as caught:  # the only thing it would serve
        preflight(worker_settings(settings, "sdxl"), handlers(sdxl=sdxl), database_url, storage)
    assert caught.value.message.startswith("nothing this worker serves can run: sdxl model OURVIDZ_SDXL_MODEL=")


@no_cuda
def test_cuda_setting_without_cuda(settings: Settings, database_url: str, tmp_path: Path) -> None:
    chat = ChatHandler(settings, model=str(_model_folder(tmp_path / "chat")), device="cuda:1")
    _, faults = preflight(worker_settings(settings, "demo", "chat"), handlers(chat=chat), database_url,
                          LocalStorage(tmp_path / "storage"))
    reason = faults["handler:chat"]
    assert reason.startswith("chat cannot run here: OURVIDZ_CHAT_DEVICE=cuda:1, but this machine has no usable CUDA")

    sdxl = SdxlHandler(settings.model_copy(update={"diffusion_device": "cuda"}),
                       model=str(_model_folder(tmp_path / "sdxl")))
    with pytest.raises(PreflightError, match="OURVIDZ_DIFFUSION_DEVICE=cuda, but this machine has no usable CUDA"):
        preflight(worker_settings(settings, "sdxl"), handlers(sdxl=sdxl), database_url,
                  LocalStorage(tmp_path / "storage"))


def test_model_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert source_problem(str(_model_folder(tmp_path / "ok"))) is None
    (tmp_path / "empty").mkdir()
    assert "not a model folder" in (source_problem(str(tmp_path / "empty")) or "")
    assert source_problem(str(tmp_path / "model.safetensors")) == "no such file or folder"
    assert source_problem("not a repo id!") == "neither a local path that exists nor a Hugging Face repo id"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert source_problem("stabilityai/stable-diffusion-xl-base-1.0") == (
        "HF_HUB_OFFLINE is set and the repo is not in the local Hugging Face cache")
    # a repo in the cache resolves offline (the layout huggingface_hub writes: refs/main -> snapshot)
    repo = tmp_path / "hub-cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    _model_folder(repo / "snapshots" / "abc123")
    assert source_problem("org/tiny") is None


# --- the database --------------------------------------------------------------------------


@pytest.fixture
def bare_database(pg_server: PostgresServer) -> Iterator[str]:
    name = f"bare_{uuid.uuid4().hex[:10]}"
    with db.connect(pg_server.url) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.database_url(name)
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_unmigrated_database_is_refused(settings: Settings, bare_database: str, database_url: str,
                                        tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    with pytest.raises(PreflightError) as caught:
        preflight(settings, handlers(), bare_database, storage)
    migrations = db.discover_migrations(settings.migrations_dir)
    assert caught.value.code == 1
    assert caught.value.message == (
        f"the database lacks {len(migrations)} of the worker's migrations (the first is "
        f"{migrations[0].version}_{migrations[0].name}): run `ourvidz-worker migrate` (or `ourvidz-worker supabase "
        "export` and `supabase db push`)")

    last = migrations[-1]
    with db.connect(database_url) as conn:  # one migration behind: a worker newer than the database
        for schema, table in (db.CLI_HISTORY, db.OWN_HISTORY):
            if conn.execute("select to_regclass(%s) as t", (f"{schema}.{table}",)).fetchone()["t"]:
                conn.execute(f"delete from {schema}.{table} where version = %s", (last.version,))
    with pytest.raises(PreflightError, match=f"lacks 1 of the worker's migrations \\(the first is {last.version}_"):
        preflight(settings, handlers(), database_url, storage)


def test_unreachable_database_is_one_sentence(settings: Settings, tmp_path: Path) -> None:
    url = "postgresql://worker:s3cret-pw@127.0.0.1:9/postgres"
    with pytest.raises(PreflightError) as caught:
        preflight(settings, handlers(), url, LocalStorage(tmp_path / "storage"))
    assert caught.value.message.startswith("cannot use the database: ") and "s3cret" not in caught.value.message
    assert caught.value.code == 1


# --- GPUs ------------------------------------------------------------------------------------


def _fake_smi(folder: Path, *lines: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    smi.chmod(0o755)
    return str(folder)


def test_gpus_the_machine_does_not_have(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_smi(tmp_path / "one", "GPU 0: H200 (UUID: GPU-aaaa)"))
    assert check_gpus(["0"], "0") == ["0"] and check_gpus(["GPU-aaaa"], "GPU-aaaa") == ["GPU-aaaa"]
    with pytest.raises(GpuError, match=r"--gpus 0,1: this machine has no GPU 1 \(it has 1: 0\)"):
        check_gpus(["0", "1"], "0,1")
    with pytest.raises(GpuError, match="no GPU MIG-zzzz"):
        check_gpus(["MIG-zzzz"], "MIG-zzzz")


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OURVIDZ_", "SUPABASE_", "CUDA_"))
            and k != "DATABASE_URL"}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "worker.cli", "run", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["refused key", "missing model", "gpus"])
def test_run_refuses_in_one_sentence(case: str, database_url: str, fake_api: FakeStorageAPI, tmp_path: Path) -> None:
    env: dict[str, Any] = {"DATABASE_URL": database_url, "OURVIDZ_HOME": str(tmp_path / "home")}
    if case == "refused key":
        env |= {"OURVIDZ_STORAGE_BACKEND": "supabase", "SUPABASE_URL": fake_api.url,
                "SUPABASE_SERVICE_ROLE_KEY": "expired-or-rotated", "OURVIDZ_STORAGE_ATTEMPTS": "1"}
        args, expected = ["--queues", "demo"], f"Supabase Storage at {fake_api.url} refused the service key"
    elif case == "missing model":
        env["OURVIDZ_SDXL_MODEL"] = str(tmp_path / "models" / "sdxl")
        args, expected = ["--queues", "sdxl"], f"sdxl model OURVIDZ_SDXL_MODEL={tmp_path / 'models' / 'sdxl'}"
    else:
        env["PATH"] = _fake_smi(tmp_path / "bin", "GPU 0: H200 (UUID: GPU-aaaa)") + os.pathsep + os.environ["PATH"]
        args, expected = ["--gpus", "0,3"], "this machine has no GPU 3"
    done = _cli(args, env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "expired-or-rotated" not in done.stderr + done.stdout
    with db.connect(database_url) as conn:
        assert conn.execute("select count(*) as n from workers").fetchone()["n"] == 0, "it never registered"
