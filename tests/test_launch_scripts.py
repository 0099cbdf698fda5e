"""The launch scripts in tpu_scripts/, run as subprocesses with --dry-run (no network, no gcloud)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU = REPO / "tpu_scripts" / "tpu_launch.py"
SLURM = REPO / "tpu_scripts" / "slurm_launch.py"

MIXTRAL = "configs/model/mixtral_8x7b.yaml"


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def dry_run_commands(stdout: str) -> list[list[str]]:
    """The `+ cmd` lines of a dry run, each split back into its argv."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith(("+ ", "# ")) for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def index_of(commands: list[list[str]], predicate, after: int = -1) -> int:
    """The first command after position `after` that satisfies predicate."""
    for i, argv in enumerate(commands):
        if i > after and predicate(argv):
            return i
    raise AssertionError(f"no matching command after #{after} in:\n" + "\n".join(map(shlex.join, commands)))


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv."""
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def is_gcloud(argv: list[str], *words: str) -> bool:
    return argv[: 1 + len(words)] == ["gcloud", *words]


# ---------------------------------------------------------------- tpu_launch.py


def test_tpu_all_dry_run_v5p64_mixtral():
    result = run_script(TPU, "all", "--dry-run", "--name", "mx", "--zone", "us-east5-a", "--project", "p",
                        "--accelerator", "v5p-64", "--spot", "--config", MIXTRAL, "--run-name", "mixtral",
                        "train.steps=10")
    assert result.returncode == 0, result.stderr
    cmds = dry_run_commands(result.stdout)
    # every gcloud command targets the same zone and project
    for argv in cmds:
        if argv[0] == "gcloud":
            assert flag(argv, "--zone") == "us-east5-a" and flag(argv, "--project") == "p", argv

    create = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "queued-resources", "create"))
    argv = cmds[create]
    assert "mx" in argv and flag(argv, "--node-id") == "mx"
    assert flag(argv, "--accelerator-type") == "v5p-64"
    assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5"  # the v5p default
    assert "--spot" in argv

    install = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "tpu-vm", "ssh") and "--worker=all" in a
                       and 'pip install' in flag(a, "--command"), after=create)
    assert "-e '.[tpu]'" in flag(cmds[install], "--command")
    # the source reached every worker before the install (copied with scp here: no --git-url)
    copy = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "tpu-vm", "scp") and "--worker=all" in a,
                    after=create)
    assert copy < install

    train = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "tpu-vm", "ssh") and "--worker=all" in a
                     and "mixtral-jax train" in flag(a, "--command"), after=install)
    remote = flag(cmds[train], "--command")
    assert f"--config {MIXTRAL}" in remote
    assert "train.steps=10" in remote and "run.name=mixtral" in remote
    assert "nohup" in remote and "MIXTRAL_JAX_CACHE=" in remote and "logs/mixtral.log" in remote
    assert "JAX_COORDINATOR_ADDRESS" not in remote  # TPU slices find their peers themselves

    logs = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "tpu-vm", "ssh") and "--worker=0" in a
                    and "tail" in flag(a, "--command"), after=train)
    fetch = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "tpu-vm", "scp") and "--worker=0" in a
                     and "mx:mixtral_jax/runs/mixtral" in a, after=logs)
    assert "--recurse" in cmds[fetch]
    delete = index_of(cmds, lambda a: is_gcloud(a, "compute", "tpus", "queued-resources", "delete"), after=fetch)
    assert "mx" in cmds[delete] and "--force" in cmds[delete]
    assert delete == len(cmds) - 1


def test_tpu_single_steps_and_defaults():
    common = ["--dry-run", "--name", "n", "--zone", "z"]
    # no --spot, no --project; v5e default image
    result = run_script(TPU, "create", *common, "--accelerator", "v5litepod-16")
    assert result.returncode == 0, result.stderr
    create = dry_run_commands(result.stdout)[0]
    assert "--spot" not in create and "--project" not in create
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    # --git-url installs from git instead of copying the tree
    result = run_script(TPU, "setup", *common, "--git-url", "https://example.com/mixtral_jax.git", "--git-ref", "v1")
    cmds = dry_run_commands(result.stdout)
    assert len(cmds) == 1 and "git clone" in flag(cmds[0], "--command") and "--worker=all" in cmds[0]
    # delete alone is one command
    cmds = dry_run_commands(run_script(TPU, "delete", *common).stdout)
    assert len(cmds) == 1 and is_gcloud(cmds[0], "compute", "tpus", "queued-resources", "delete")


@pytest.mark.parametrize("args, message", [
    (["all", "--dry-run", "--zone", "z", "--accelerator", "v5p-64", "--config", MIXTRAL, "--run-name", "r"],
     "--name"),
    (["create", "--dry-run", "--name", "n", "--zone", "z"], "--accelerator"),
    (["train", "--dry-run", "--name", "n", "--zone", "z", "--run-name", "r"], "--config"),
    (["train", "--dry-run", "--name", "n", "--zone", "z", "--run-name", "r", "--config", MIXTRAL, "steps10"],
     "key=value"),
    (["train", "--dry-run", "--name", "n", "--zone", "z", "--run-name", "r", "--config", "configs/nope.yaml"],
     "not found"),
    (["create", "--dry-run", "--name", "n", "--zone", "z", "--accelerator", "v99-8"], "--runtime-version"),
    ([], "required"),
])
def test_tpu_usage_errors_are_one_line_status_2(args, message):
    result = run_script(TPU, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], result.stderr


# ---------------------------------------------------------------- slurm_launch.py


def slurm_dry_run(mode: str, *extra: str) -> tuple[str, list[list[str]]]:
    result = run_script(SLURM, "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--mode", mode,
                        "--partition", "gpu", "--time", "04:00:00", "--config", MIXTRAL, "--run-name", "mixtral",
                        *extra, "train.steps=10")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    return result.stdout, commands


@pytest.mark.parametrize("mode, tasks_per_node", [("per-gpu", 8), ("per-node", 1)])
def test_slurm_script(mode, tasks_per_node):
    script, commands = slurm_dry_run(mode)
    sbatch = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    assert {"--nodes=2", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=8", "--partition=gpu",
            "--time=04:00:00"} <= sbatch
    # the coordinator is the first host of the nodelist
    assert re.search(r'^COORDINATOR_HOST=\$\(scontrol show hostnames "?\$SLURM_JOB_NODELIST"? \| head -n 1\)$',
                     script, re.M)
    assert re.search(r'^export JAX_COORDINATOR_ADDRESS="?\$COORDINATOR_HOST:\$COORDINATOR_PORT"?$', script, re.M)
    assert re.search(r'^export JAX_NUM_PROCESSES="?\$SLURM_NTASKS"?$', script, re.M)

    srun_lines = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun_lines) == 1
    srun = shlex.split(srun_lines[0])
    task_shell = srun[srun.index("-c") + 1]
    # per task (inside srun, where SLURM_PROCID differs): the process id, and in per-gpu mode its GPU
    assert "export JAX_PROCESS_ID=$SLURM_PROCID" in task_shell
    assert ("CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in task_shell) == (mode == "per-gpu")
    assert ("CUDA_VISIBLE_DEVICES" in script) == (mode == "per-gpu")
    # then runs the training command with the config and the overrides
    train = srun[srun.index("mixtral-jax"):]
    assert train[:4] == ["mixtral-jax", "train", "--config", MIXTRAL]
    assert "train.steps=10" in train and "run.name=mixtral" in train
    # and the sbatch command is printed
    assert commands == [["sbatch", "slurm/mixtral.sbatch"]]


def test_slurm_script_is_valid_bash_and_writes_file(tmp_path):
    out = tmp_path / "job.sbatch"
    result = run_script(SLURM, "--nodes", "1", "--gpus-per-node", "4", "--config", MIXTRAL, "--output", str(out),
                        "--log", str(tmp_path / "job.out"), "--venv", ".venv", "--env", "XLA_FLAGS=--xla_foo=1")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "#SBATCH --ntasks-per-node=4" in text and "source .venv/bin/activate" in text
    assert "export XLA_FLAGS=--xla_foo=1" in text
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0  # syntax check only


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "8", "--config", MIXTRAL], "--nodes"),
    (["--nodes", "2", "--config", MIXTRAL], "--gpus-per-node"),
    (["--nodes", "2", "--gpus-per-node", "8"], "--config"),
    (["--nodes", "2", "--gpus-per-node", "8", "--config", MIXTRAL, "--mode", "per-core"], "--mode"),
    (["--nodes", "0", "--gpus-per-node", "8", "--config", MIXTRAL], ">= 1"),
])
def test_slurm_usage_errors_are_one_line_status_2(args, message):
    result = run_script(SLURM, "--dry-run", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], result.stderr


# ---------------------------------------------------------------- tpu_launch.py for real, against a fake gcloud

FAKE_GCLOUD = r'''#!PYTHON
"""Stands in for gcloud: records its argv, reports PROVISIONING then ACTIVE, fails training if asked."""
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
if "describe" in argv:
    counter = os.environ["FAKE_LOG"] + ".describes"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    print("PROVISIONING" if n == 0 else "ACTIVE")
if "--command" in argv and "mixtral-jax train" in argv[argv.index("--command") + 1]:
    sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
'''


@pytest.mark.parametrize("train_rc", [0, 1])
def test_tpu_all_runs_steps_in_order_and_always_deletes(tmp_path, train_rc):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log),
           "FAKE_TRAIN_RC": str(train_rc)}
    result = subprocess.run([sys.executable, str(TPU), "all", "--name", "fake", "--zone", "z", "--accelerator",
                             "v5p-8", "--poll-interval", "0", "--dest", str(tmp_path / "runs"), "--config", MIXTRAL,
                             "--run-name", "r"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [" ".join(argv[2:4]) for argv in calls]  # e.g. "queued-resources create", "tpu-vm ssh"
    # requested, polled until ACTIVE (PROVISIONING, then ACTIVE), ..., and deleted whether training ran or not
    assert steps[:3] == ["queued-resources create", "queued-resources describe", "queued-resources describe"]
    assert steps[-1] == "queued-resources delete"
    if train_rc == 0:
        assert result.returncode == 0, result.stderr
        # copy, install, train, logs, fetch run dir, fetch log
        assert steps[3:-1] == ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm scp", "tpu-vm scp"]
    else:
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "exit status 1" in lines[0], result.stderr
        assert steps[3:-1] == ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]  # copy, install, train (which failed)
    assert not (Path(tempfile.gettempdir()) / "mixtral_jax-fake.tar.gz").exists()  # the local tarball is cleaned up
