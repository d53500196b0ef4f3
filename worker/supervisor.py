"""`ourvidz-worker run --gpus all|0,1`: one worker process per GPU, pinned with CUDA_VISIBLE_DEVICES.

The supervisor starts `python -m worker.cli run ...` once per GPU with the options it was given,
restarts a child that crashes (with backoff) and, on SIGTERM/SIGINT, forwards the signal and waits
for every child to drain. It never initialises CUDA and never opens a database connection itself:
the children are ordinary workers and the database coordinates them like any other.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import typer

from worker.config import Settings

log = logging.getLogger(__name__)

USAGE_ERROR = 2  # click's exit code for bad options: restarting would fail the same way
_GPU_LINE = re.compile(r"^GPU (\d+):")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)")


class GpuError(typer.BadParameter):
    def __init__(self, message: str) -> None:
        super().__init__(message, param_hint="--gpus")


# -- which GPUs ---------------------------------------------------------------------------


def parse_gpus(spec: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each child.

    `all`: every GPU this process may use. Otherwise a comma-separated list of ordinals or
    GPU/MIG UUIDs. Ordinals count the GPUs this process sees, so under CUDA_VISIBLE_DEVICES=2,3
    `--gpus 0,1` means physical GPUs 2 and 3, as CUDA itself would number them.
    """
    env = os.environ if env is None else env
    inherited = _visible_devices(env)
    if spec.strip().lower() == "all":
        gpus = inherited if inherited is not None else enumerate_gpus()
        if not gpus:
            raise GpuError("--gpus all: no GPU found (nvidia-smi -L and torch.cuda.device_count() see none)")
        return gpus
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise GpuError(f"--gpus {spec!r}: expected 'all' or a list such as 0,1")
    gpus = []
    for token in tokens:
        if token.isdigit() and inherited is not None:
            if int(token) >= len(inherited):
                raise GpuError(f"--gpus {spec!r}: GPU {token} is not among "
                               f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
            token = inherited[int(token)]
        elif not (token.isdigit() or token.startswith(("GPU-", "MIG-"))):
            raise GpuError(f"--gpus {spec!r}: {token!r} is neither a GPU ordinal nor a GPU/MIG UUID")
        gpus.append(token)
    if len(set(gpus)) != len(gpus):
        raise GpuError(f"--gpus {spec!r} names a GPU twice; use --concurrency for several jobs on one GPU")
    return gpus


def _visible_devices(env: Mapping[str, str]) -> list[str] | None:
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    devices = []
    for token in (t.strip() for t in value.split(",")):
        if not token or token.startswith("-"):
            break  # CUDA ignores an invalid entry and everything after it
        devices.append(token)
    return devices


def enumerate_gpus() -> list[str]:
    """GPUs from `nvidia-smi -L` (MIG instances by UUID), else torch.cuda.device_count() in a
    subprocess: CUDA initialised in the supervisor would hold a context on every GPU for its
    whole life."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None:
        return parse_nvidia_smi(out)
    try:
        count = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout.strip()
        return [str(i) for i in range(int(count or 0))]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def parse_nvidia_smi(listing: str) -> list[str]:
    """`nvidia-smi -L` output -> ordinals, with a GPU split by MIG replaced by its instances' UUIDs."""
    gpus: list[list[str]] = []  # per GPU: [ordinal, mig uuids...]
    for line in listing.splitlines():
        if m := _GPU_LINE.match(line):
            gpus.append([m.group(1)])
        elif (m := _MIG_LINE.match(line)) and gpus:
            gpus[-1].append(m.group(1))
    return [uuid for gpu in gpus for uuid in (gpu[1:] or gpu[:1])]


# -- the children's command line ----------------------------------------------------------


def passthrough(ctx: typer.Context, skip: Sequence[str], settings: Settings | None = None,
                ) -> tuple[list[str], dict[str, int]]:
    """The options given on this command line, as arguments for a child `run` (minus `skip`), and
    the `*_port` options apart (also when set through the environment, i.e. in `settings`): each
    child gets the port plus its index so that they do not collide."""
    args: list[str] = []
    ports: dict[str, int] = {}
    for param in ctx.command.params:
        name = param.name
        if param.param_type_name != "option" or name is None or name in skip:
            continue
        source = ctx.get_parameter_source(name)
        given = source is not None and source.name == "COMMANDLINE"
        value = ctx.params[name]
        opt = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        flag = getattr(param, "is_flag", False)
        if name.endswith("_port"):
            port = value if given else getattr(settings, name, None)
            if isinstance(port, int):
                ports[opt] = port
            continue
        if not given or value is None:
            continue  # defaults stay defaults, and the environment is inherited anyway
        if flag:
            if value:
                args.append(opt)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                args += [opt, str(item)]
        else:
            args += [opt, *(str(v) for v in value)] if isinstance(value, tuple) else [opt, str(value)]
    return args, ports


# -- supervision --------------------------------------------------------------------------


@dataclass
class Child:
    index: int
    gpu: str
    base_id: str
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    quick_failures: int = 0
    exit_code: int | None = None  # of its last exit

    @property
    def worker_id(self) -> str:
        # a restarted child is a new worker row: the dead one keeps its id, for the WORKER_LOST
        # errors of the jobs it held and for the stale-worker view
        return self.base_id if self.starts <= 1 else f"{self.base_id}-r{self.starts - 1}"

    @property
    def finished(self) -> bool:
        return self.popen is None and self.restart_at is None


@dataclass
class Supervisor:
    gpus: Sequence[str]
    run_args: Sequence[str]
    base_worker_id: str
    ports: Mapping[str, int] = field(default_factory=dict)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0  # a child that ran this long before crashing restarts without delay growth
    kill_after: float | None = None  # seconds after the first stop signal before SIGKILL
    env: Mapping[str, str] | None = None
    children: list[Child] = field(init=False)
    stop_signal: int | None = field(default=None, init=False)
    fatal: bool = field(default=False, init=False)
    _kill_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.children = [Child(i, gpu, f"{self.base_worker_id}-gpu{gpu if gpu.isdigit() else i}")
                         for i, gpu in enumerate(self.gpus)]

    def command(self, child: Child) -> list[str]:
        # port 0 (any free port) stays 0 for every child
        ports = [arg for opt, port in self.ports.items() for arg in (opt, str(port + child.index if port else 0))]
        return [sys.executable, "-m", "worker.cli", "run", *self.run_args, *ports, "--worker-id", child.worker_id]

    def child_env(self, child: Child) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env["CUDA_VISIBLE_DEVICES"] = child.gpu
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # ordinals as nvidia-smi numbers them
        return env

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("supervising %d worker(s) on GPU(s) %s", len(self.children), ", ".join(self.gpus))
        for child in self.children:
            self._spawn(child)
        while not all(child.finished for child in self.children):
            now = time.monotonic()
            for child in self.children:
                if child.popen is not None and (code := child.popen.poll()) is not None:
                    self._exited(child, code, now)
                if child.restart_at is not None and self.stop_signal is not None:
                    child.restart_at = None  # stopping: a crashed child stays down
                elif child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child)
            if self._kill_at is not None and now >= self._kill_at:
                for child in self.children:
                    if child.popen is not None and child.popen.poll() is None:
                        log.warning("worker %s did not stop in time: killing it", child.worker_id)
                        child.popen.kill()
                self._kill_at = None
            time.sleep(0.1)
        if self.fatal:
            return USAGE_ERROR
        return 0 if all(self._clean(child.exit_code) for child in self.children) else 1

    def _clean(self, code: int | None) -> bool:
        # killed by the forwarded signal itself: it arrived before the child installed its
        # handler, so the child had not claimed anything yet
        return code == 0 or (self.stop_signal is not None and code == -self.stop_signal)

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.starts += 1
        child.started_at = time.monotonic()
        child.popen = subprocess.Popen(self.command(child), env=self.child_env(child), process_group=0,
                                       preexec_fn=_die_with_parent(os.getpid()))
        log.info("started worker %s on GPU %s (pid %d)", child.worker_id, child.gpu, child.popen.pid)
        if self.stop_signal is not None:  # the stop signal came while it was being started
            child.popen.send_signal(self.stop_signal)

    def _exited(self, child: Child, code: int, now: float) -> None:
        log.log(logging.INFO if code == 0 else logging.WARNING, "worker %s on GPU %s (pid %d) exited with %d",
                child.worker_id, child.gpu, child.popen.pid if child.popen else -1, code)
        child.popen = None
        child.exit_code = code
        if self.stop_signal is not None or code == 0:
            return  # drained, or done (--max-jobs)
        if code == USAGE_ERROR:
            log.error("worker %s rejected its options: stopping every worker", child.worker_id)
            self.fatal = True
            self._stop(signal.SIGTERM)
            return
        child.quick_failures = 0 if now - child.started_at >= self.stable_after else child.quick_failures + 1
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, child.quick_failures - 1))
        child.restart_at = now + delay
        log.warning("restarting the worker on GPU %s in %.1fs", child.gpu, delay)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: %s", signal.Signals(signum).name,
                 "forwarding again" if self.stop_signal is not None else "draining every worker")
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            if self.kill_after is not None:
                self._kill_at = time.monotonic() + self.kill_after
        for child in self.children:
            child.restart_at = None
            if child.popen is not None and child.popen.poll() is None:
                child.popen.send_signal(signum)  # a second SIGINT/SIGTERM makes a worker release at once


def _die_with_parent(parent: int) -> Any:
    """A child that outlives a SIGKILLed supervisor would keep its GPU: Linux sends it SIGTERM
    (a normal drain) when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def supervise(spec: str, settings: Settings, ctx: typer.Context) -> int:
    """Entry point of `run --gpus`: the children get this command line's options."""
    from worker.preflight import check_gpus

    gpus = check_gpus(parse_gpus(spec), spec)  # GPUs this machine has, or one sentence why not
    args, ports = passthrough(ctx, ("gpus", "worker_id"), settings)
    return Supervisor(gpus, args, settings.resolved_worker_id, ports,
                      kill_after=settings.shutdown_grace + 60).run()
