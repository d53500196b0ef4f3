"""deploy/: the Dockerfile and the Kubernetes/KEDA example cannot run here, so they are parsed,
cross-checked against each other and against the CLI, and the KEDA query is run on the migrated
schema to show that it is valid and follows the backlog."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from worker import db
from worker.cli import app
from worker.health import ENDPOINTS as HEALTH_ENDPOINTS
from worker.queue import JobQueue

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
K8S = REPO_ROOT / "deploy" / "k8s" / "worker.yaml"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instruction, _, args = (pending + stripped).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, "a continuation line at the end of the Dockerfile"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def run_options_parse(args: list[str]) -> dict[str, Any]:
    """What `ourvidz-worker run ARGS` would parse to, without running it: unknown options fail."""
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    with command.make_context("run", list(args)) as ctx:
        return dict(ctx.params)


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


# --- Dockerfile --------------------------------------------------------------------------


def stages(docker: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The build stages: base image (ARG defaults before the first FROM expanded), name, instructions."""
    args = {}
    for instr, rest in docker:
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    found: list[dict[str, Any]] = []
    for instr, rest in docker:
        if instr == "FROM":
            image, _, name = rest.partition(" AS ")
            for key, value in args.items():
                image = image.replace("${" + key + "}", value)
            found.append({"image": image.strip(), "name": name.strip() or None, "steps": []})
        elif found:
            found[-1]["steps"].append((instr, rest))
    return found


def test_dockerfile_installs_the_built_wheel_with_torch_pinned_and_cuda_once(docker):
    build, final = stages(docker)
    assert build["name"] == "build" and final["name"] is None, "a wheel stage, then the image"
    images = [build["image"], final["image"]]
    assert all(image.startswith("python:3.11") for image in images), images
    assert not any("cuda" in image for image in images), "CUDA comes with the torch wheel alone"
    everything = " ".join(rest for _instr, rest in docker)
    assert "-e ." not in everything and "--editable" not in everything, "never an editable install"
    assert not any(pkg in everything for pkg in ("cuda-", "libcudnn", "nvidia-cuda")), "no second CUDA from apt"

    # stage 1: the sources in, the wheel out
    copied = [shlex.split(rest)[0] for instr, rest in build["steps"] if instr == "COPY"]
    assert {"pyproject.toml", "worker", "sql"} <= set(copied), "the wheel carries sql/ (package data)"
    [wheel] = [rest for instr, rest in build["steps"] if instr == "RUN" and "pip wheel" in rest]
    assert "--no-deps" in wheel and "/dist" in wheel

    # stage 2: torch at one exact version, the same as scripts/install.sh, then the wheel with torch held
    final_args = dict(rest.partition("=")[::2] for instr, rest in final["steps"] if instr == "ARG")
    version = final_args["TORCH_VERSION"]
    install_sh = (REPO_ROOT / "scripts" / "install.sh").read_text()
    assert f"TORCH_SPEC:-torch=={version}}}" in install_sh, "image and install script pin the same torch"
    runs = [rest for instr, rest in final["steps"] if instr == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    wheel_at = next(i for i, run in enumerate(runs) if "ourvidz_worker-*.whl" in run)
    assert torch_at < wheel_at and '"torch==${TORCH_VERSION}"' in runs[wheel_at], "nothing moves torch"
    assert [rest for instr, rest in final["steps"] if instr == "COPY"] == ["--from=build /dist/ /tmp/dist/"]
    assert any("tini" in run for run in runs)

    # every COPY source from the context is in the repository and not ignored
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] == "*", "ignore everything but what the image needs"
    for source in copied:
        assert (REPO_ROOT / source).exists(), source
        assert f"!{source}" in ignore, f"{source} is not sent to the build"

    users = [rest for instr, rest in final["steps"] if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker does not run as root"

    [entrypoint] = [exec_form(rest) for instr, rest in final["steps"] if instr == "ENTRYPOINT"]
    [cmd] = [exec_form(rest) for instr, rest in final["steps"] if instr == "CMD"]
    start = entrypoint.index("ourvidz-worker")
    assert entrypoint[start + 1] == "run" and entrypoint[:start] == ["tini", "--"]
    params = run_options_parse(entrypoint[start + 2:] + cmd)
    assert params["gpus"] == "all"


# --- Kubernetes and KEDA -----------------------------------------------------------------


def test_k8s_example_is_consistent(manifests, docker):
    assert {"Secret", "Deployment", "TriggerAuthentication", "ScaledObject"} <= set(manifests)
    deployment, scaled = manifests["Deployment"], manifests["ScaledObject"]
    assert deployment["apiVersion"] == "apps/v1" and scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()

    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # args follow the image's ENTRYPOINT `ourvidz-worker run`: they must be valid `run` options
    params = run_options_parse(container["args"])
    assert params["gpus"] == "all"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["OURVIDZ_STORAGE_BACKEND"] == "supabase"
    assert pod["terminationGracePeriodSeconds"] > float(env["OURVIDZ_SHUTDOWN_GRACE"]), \
        "Kubernetes must not kill a pod before the worker's own grace has run out"
    secret = manifests["Secret"]
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == [secret["metadata"]["name"]]
    assert {"DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"} <= set(secret["stringData"])
    assert ":5432/" in secret["stringData"]["DATABASE_URL"], "a LISTENing worker needs session mode or direct"
    # Liveness restarts only what a restart fixes (/livez never fails for a database outage);
    # readiness also needs the database and no fault of the worker's own.
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    assert {probe["path"] for probe in probes.values()} <= set(HEALTH_ENDPOINTS)
    for probe in probes.values():
        [port] = [p for p in container["ports"] if p["name"] == probe["port"]]
        assert port["containerPort"] == params["health_port"]

    # KEDA owns the replica count of the Deployment it scales.
    assert "replicas" not in deployment["spec"]
    resources = container["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"} <= set(requests)
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], "extended resources: request equals limit"
    for name in ("memory", "ephemeral-storage"):
        assert quantity(requests[name]) <= quantity(limits[name]), name
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert quantity(models["emptyDir"]["sizeLimit"]) <= quantity(limits["ephemeral-storage"]), \
        "the model cache counts against the pod's ephemeral storage: a fuller one gets the pod evicted"

    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    auth = manifests["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    meta = trigger["metadata"]
    assert float(meta["targetQueryValue"]) > 0 and float(meta["activationTargetQueryValue"]) >= 0
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    assert 0 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (4, 500m, 32Gi, 1G) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|K|M|G|T)?", str(value))
    assert match, f"not a quantity: {value!r}"
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2)]
    return float(match.group(1)) * scale


def keda_query(manifests: dict[str, dict[str, Any]]) -> str:
    return manifests["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]


def scalar(url: str, sql: str) -> Any:
    with db.connect(url) as conn:
        rows = conn.execute(sql).fetchall()
    assert len(rows) == 1 and len(rows[0]) == 1, f"KEDA needs one row with one value: {rows}"
    return next(iter(rows[0].values()))


def test_keda_query_follows_the_gpu_backlog(manifests, database_url, queue: JobQueue, sql):
    query = keda_query(manifests)
    assert "public.queue_depth" in query
    served = {r["queue"] for r in sql.execute("select distinct queue from job_types where queue <> 'demo'")}
    assert served == {"sdxl", "wan", "chat"}, "the query's queue list must cover every GPU queue"

    assert scalar(database_url, query) == 0, "nothing queued: scale to minReplicaCount"
    jobs = [queue.enqueue("sdxl_image_fast", {"prompt": f"cat {i}"}) for i in range(3)]
    jobs.append(queue.enqueue("video_fast", {"prompt": "a wave"}))
    jobs.append(queue.enqueue("chat_conversation", {"prompt": "hi"}))
    value = scalar(database_url, query)
    assert isinstance(value, int) and value == 5, "KEDA's query must return an integer"

    queue.enqueue("simulate", {})  # the demo queue needs no GPU
    sql.execute("insert into jobs (job_type, payload, run_at) values ('sdxl_image_fast', '{}', now() + interval '1h')")
    [sdxl] = sql.execute("select queued, scheduled from queue_depth where queue = 'sdxl'").fetchall()
    assert sdxl == {"queued": 3, "scheduled": 1}
    assert scalar(database_url, query) == 5, "demo and not-yet-due (retry backoff) jobs do not count"

    claimer = JobQueue(queue.pool, "keda-test-worker", 30.0)
    [claimed] = claimer.claim(["sdxl_image_fast"], 1)
    assert queue.get_job(claimed.id)["status"] == "processing"
    assert scalar(database_url, query) == 5, "a running job still needs its GPU"

    queue.request_cancel(jobs[-1])
    assert queue.get_job(jobs[-1])["status"] == "canceled"
    assert scalar(database_url, query) == 4
