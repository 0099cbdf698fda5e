"""Benchmarks must be known to work before they are needed: run their --smoke modes on CPU (the GPU
check before a GPU is at hand; the CPU performance benchmarks of train step, data pipeline and
compile time)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_and_reports_mfu():
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("dense ", "moe "))]
    assert len(rows) == 2, out.stdout
    for row in rows:
        mfu = float(re.search(r"([\d.]+)%\s*$", row).group(1))
        assert 0 < mfu < 100, row
    assert "dropless" in out.stdout and "capacity" in out.stdout  # the dispatch table ran too
    assert re.search(r"^pallas .* max grad error", out.stdout, re.M)  # and the grouped-matmul check
    assert re.search(r"^window \d+\s+library, document mask", out.stdout, re.M)  # and the attention check


# ---------------------------------------------------------------- CPU performance benchmarks
# Each runs its --smoke mode (tiny shapes) and must print its ratio lines; the values are only
# checked to be finite and positive: targets are for the full runs on a quiet machine.

RATIO = re.compile(r"^ratio (?P<name>.+?): (?P<value>\S+)x \((?P<target>.*)\) (?P<verdict>PASS|MISS)$")


def _run_smoke(module: str) -> dict[str, float]:
    """Run `python -m benchmarks.<module> --smoke` (inheriting the suite's XLA_FLAGS: 8 host
    devices, of which the benchmarks must use one) and return its ratio lines by name."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = {}
    for line in out.stdout.splitlines():
        if line.startswith("ratio "):
            match = RATIO.match(line)
            assert match, line
            ratios[match["name"]] = float(match["value"])
    for name, value in ratios.items():
        assert math.isfinite(value) and value > 0, (name, value, out.stdout)
    return ratios


def test_train_step_smoke_prints_ratios():
    pytest.importorskip("transformers")
    ratios = _run_smoke("train_step")
    assert set(ratios) == {"dense ours/torch tokens/s", "moe ours/torch tokens/s", "dense MFU / measured peak",
                           "ours moe/dense step time", "torch moe/dense step time"}, ratios
    assert ratios["dense MFU / measured peak"] < 1.5  # an MFU, not a mislabelled throughput


def test_data_pipeline_smoke_prints_ratios(corpus_cache):
    ratios = _run_smoke("data_pipeline")
    assert {name.split(" / ")[0] for name in ratios} == {"pipeline b4 w0", "pipeline b4 w2"}, ratios


def test_compile_time_smoke_prints_ratios():
    ratios = _run_smoke("compile_time")
    assert set(ratios) == {"dense compile 32 layers / 4 layers"}, ratios


def test_layer_layout_smoke_runs_the_same_model_both_ways():
    # The script exits non-zero when the per-layer prototype's loss differs from our step's.
    ratios = _run_smoke("layer_layout")
    assert set(ratios) == {"moe per-layer/stacked step time"}, ratios


def test_train_loop_smoke_compares_the_real_loop_with_torch(corpus_cache):
    pytest.importorskip("transformers")
    ratios = _run_smoke("train_loop")
    assert len(ratios) == 1 and next(iter(ratios)).startswith("worst ours/torch ("), ratios


def test_moe_dispatch_smoke_covers_every_row_kind():
    # plain, fine-grained (64 experts top-8, width dim / 2) and a gated shared expert, each
    # against its dense-equivalent layer (routed + shared width) in the same rounds
    ratios = _run_smoke("moe_dispatch")
    names = sorted(ratios)
    assert len(names) == 3, ratios
    assert any("E64 k8" in n and "width 32" in n for n in names), names
    assert any("1 shared gated" in n for n in names), names


def test_downstream_smoke_scores_the_same_requests_as_lm_evals_hf_backend(corpus_cache):
    # The script exits non-zero when its log-likelihoods and HFLM's differ by more than 1e-3.
    for module in ("lm_eval", "transformers", "accelerate"):
        pytest.importorskip(module)
    ratios = _run_smoke("downstream")
    assert set(ratios) == {"ours/HF requests/s (warm)", "ours/HF requests/s (compiles included)"}, ratios


def test_checkpoint_integrity_smoke_prints_save_and_restore_ratios():
    ratios = _run_smoke("checkpoint_integrity")
    assert set(ratios) == {f"quickstart {kind} with/without digests"
                           for kind in ("async save", "save until committed", "restore")}, ratios
