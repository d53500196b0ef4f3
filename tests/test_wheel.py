"""The wheel is the product (issue 11, item 4): built from the tree, installed (not editable) into
a fresh virtualenv outside the checkout, it migrates an empty database and runs a job.

To take seconds, not minutes, the fresh venv gets the wheel alone (--no-deps) and finds the
dependencies in this run's own site-packages through a .pth path line; that line adds the folder
only, so its editable-install hook for the checkout never runs and `worker` can only come from the
wheel (the test checks). .ci/run does the same with a full install of the wheel and its
dependencies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PostgresServer
from worker import db

REPO_ROOT = Path(__file__).resolve().parent.parent


def _source_files() -> list[Path]:
    """What a clean clone holds (plus files not yet committed): never build/ leftovers or caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is needed to tell the source tree from build output")
    return [Path(name) for name in listed if name and (REPO_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    for name in _source_files():
        if name.parts[0] in ("worker", "sql") or name.name in ("pyproject.toml", "README.md"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(work / "dist"), str(source)], capture_output=True, text=True, check=False)
    if built.returncode != 0:
        if "No module named" in built.stderr or "setuptools" in built.stderr.lower():
            pytest.skip(f"the wheel cannot be built offline here: {built.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip wheel failed:\n{built.stdout}\n{built.stderr}")
    [path] = (work / "dist").glob("ourvidz_worker-*.whl")
    return path


def test_the_wheel_carries_every_module_and_sql_file(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO_ROOT / "sql").rglob("*.sql"):
        assert f"worker/sql/{path.relative_to(REPO_ROOT / 'sql').as_posix()}" in names, path
    for path in (REPO_ROOT / "worker").rglob("*.py"):
        assert path.relative_to(REPO_ROOT).as_posix() in names, f"{path} missing: list its package in pyproject.toml"
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "ourvidz-worker = worker.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "_ourvidz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture
def empty_database(pg_server: PostgresServer) -> Iterator[str]:
    name = f"wheel_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server.url) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.database_url(name)
    with db.connect(pg_server.url) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_installed_wheel_migrates_and_runs_a_job(installed: Path, empty_database: str, tmp_path: Path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OURVIDZ_", "SUPABASE_", "PYTHON")) and k != "DATABASE_URL"}
    env.update(DATABASE_URL=empty_database, OURVIDZ_HOME=str(outside / "home"))
    script = installed / "bin" / "ourvidz-worker"

    def ok(*args: str) -> str:
        done = subprocess.run([str(script), *args], env=env, cwd=outside, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, f"{args}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    where = subprocess.run([installed / "bin" / "python", "-c", "import worker; print(worker.__file__)"], env=env,
                           cwd=outside, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed), f"worker imported from {where}, not from the wheel"

    migrations = sorted(p.stem for p in (REPO_ROOT / "sql" / "migrations").glob("*.sql"))
    applied = ok("migrate")
    assert f"applied {len(migrations)} migration(s)" in applied, applied
    job_id = ok("enqueue", "simulate", "--payload", '{"config": {"steps": 2, "step_seconds": 0}}').strip()
    assert "claimed=1, completed=1" in ok("run", "--max-jobs", "1", "--worker-id", "wheel-worker")
    [row] = [r for r in json.loads(ok("jobs", "--json")) if r["id"] == job_id]
    assert row["status"] == "completed" and row["worker_id"] == "wheel-worker"
