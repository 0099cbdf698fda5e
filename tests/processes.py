"""Launching the worker processes of a multi-process JAX test on localhost: a free port for the
coordinator, one `python SCRIPT INDEX PORT ARGS...` per process, every exit status checked.
Shared by the multi-process training, data-sharding and checkpoint tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, worker_args: list[list[str]], *, devices_per_process: int, env: dict | None = None,
                timeout: float = 300, tag: str = "") -> list[str]:
    """Run len(worker_args) processes of `script` (CPU, `devices_per_process` host devices each) as
    one JAX job; returns each one's output. A worker that fails or hangs fails the test with the
    tail of its output (the others are killed, never left behind)."""
    port = free_port()
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}", **(env or {})}
    workers = [subprocess.Popen([sys.executable, script, str(i), str(port), *args], env=full_env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i, args in enumerate(worker_args)]
    logs = []
    try:
        for w in workers:
            logs.append(w.communicate(timeout=timeout)[0])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for i, w in enumerate(workers):
        assert w.returncode == 0, f"{tag + ' ' if tag else ''}worker {i} failed:\n{logs[i][-3000:]}"
    return logs
