"""scripts/bench_gpu.py in its smoke mode: the tiny models on CPU run every stage and write the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"
STAGES = ["sdxl", "wan", "qwen", "sdxl_x6", "chat_wan", "overhead"]


def test_tiny_smoke_run_writes_every_stage(tmp_path: Path, database_url: str) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out),
                           "--database-url", database_url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert list(data["stages"]) == STAGES
    for name, figures in data["stages"].items():
        assert figures["status"] == "ok", (name, figures)
    stages = data["stages"]
    assert stages["sdxl"]["raw_s"] > 0 and stages["sdxl"]["job_s"] > 0
    assert stages["wan"]["step_s"] > 0 and stages["wan"]["decode_s"] > 0
    assert "job_3_steps_s" in stages["wan"]
    assert stages["qwen"]["single_stream_tok_s"] > 0 and stages["qwen"]["batch_8_tok_s"] > 0
    assert stages["chat_wan"]["during_wan_tok_s"] > 0
    overhead = stages["overhead"]
    assert overhead["handler_overhead_ms"] == 1000 * (stages["sdxl"]["job_s"] - stages["sdxl"]["raw_s"])
    assert "worker_skipped" not in overhead, overhead
    assert overhead["worker_jobs"] >= 2 and overhead["worker_job_s"] > 0
    assert data["meta"]["tiny"] is True and data["meta"]["total_s"] > 0
    # each stage's figures were printed as they landed
    assert all(f"[{name}]" in done.stdout for name in STAGES)


def test_full_size_without_a_gpu_is_one_sentence(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "need a GPU" in done.stderr and "Traceback" not in done.stderr
