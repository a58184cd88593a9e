"""Patched transformers under diffusers' context parallelism (Ulysses), 2 gloo processes on the CPU: every
span, at the plan's split and inside it, patched before or after enable_parallelism, equals the same model
patched in one process (tests/context_parallel_worker.py runs the cases under torchrun)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HERE = Path(__file__).resolve().parent


def test_spans_under_ulysses_context_parallelism_match_one_process():
    pytest.importorskip("diffusers", minversion="0.36")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(HERE / "context_parallel_worker.py"),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12, run.stdout
    assert sum(row["per_sample"] for row in rows) == 2
    for row in rows:
        assert row["vs_single"] <= 1e-5, row
        assert row["vs_unpatched"] > 1e-3, row  # the bypass acts
