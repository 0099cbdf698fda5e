"""`mixtral-jax compile`: the real train step compiled for a mesh on host devices, XLA's memory
analysis reported per device; checked against parameter bytes counted by hand."""

import json
import os
import subprocess
import sys

from mixtral_jax.cli import main
from mixtral_jax.models.params import param_counts
from mixtral_jax.config import load_config

TINY = ["model.n_layers=2", "data.batch_size=8", "data.seq_len=64"]


def test_compile_reports_xla_memory_per_device(capsys):
    assert main(["compile", "--config", "configs/quickstart.yaml", *TINY, "--mesh", "data=2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    params = param_counts(load_config("configs/quickstart.yaml", TINY).model)["total"]
    # Replicated over data=2: every device holds the float32 params and AdamW's two moments,
    # plus the batch rows (5 arrays of 4 rows x 64) and a few scalars (step, rng, counts).
    expected = 3 * params * 4 + 5 * 4 * 64 * 4
    assert expected <= report["xla"]["arguments"] <= expected + 1024
    assert report["xla"]["temp"] > 0 and report["compile_s"] > 0
    assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 1}


def test_compile_verb_errors_are_one_line(capsys):
    flags = os.environ.get("XLA_FLAGS")
    assert main(["compile", "--config", "configs/quickstart.yaml", "--mesh", "fsdp=16"]) == 2
    assert os.environ.get("XLA_FLAGS") == flags  # later subprocesses must not inherit 16 devices
    err = capsys.readouterr().err
    assert "needs 16 devices but JAX has 8" in err and err.count("\n") == 1
    assert main(["compile", "--config", "configs/quickstart.yaml", "--mesh", "fsdb=2"]) == 2
    assert "did you mean 'fsdp'" in capsys.readouterr().err
    assert main(["compile", "--config", "configs/quickstart.yaml", "--mesh", "fsdp=2", "--device", "h1000"]) == 2
    assert "unknown device 'h1000'" in capsys.readouterr().err


def test_compile_verb_provides_its_own_host_devices():
    """In a fresh process without XLA_FLAGS the verb asks XLA for the mesh's device count."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "compile", "--config", "configs/quickstart.yaml",
                          *TINY, "--mesh", "fsdp=2,expert=2", "--device", "h100"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mesh fsdp=2 x expert=2" in out.stdout and "fits h100" in out.stdout
    # the exchange buffers of an expert-parallel MoE: the padded one compiled here, the ragged one a GPU runs
    lines = {name: next(l for l in out.stdout.splitlines() if f"exchange buffers per MoE layer, {name}" in l)
             for name in ("padded", "ragged")}
    units = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
    send = {}
    for name, line in lines.items():
        value, unit = line.split("send ")[1].split(",")[0].split()
        send[name] = float(value) * units[unit]
    # 128 tokens per device x top-2 x 128 dims x 4 bytes: the ragged send holds exactly the slots;
    # the padded one a worst-case block for each of the 2 peers
    assert send["ragged"] == 128 * 2 * 128 * 4 and send["padded"] == 2 * send["ragged"]
