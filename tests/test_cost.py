"""FLOPs, device-hours and dollars against hand calculations (issue: cost accounting)."""

import json
import subprocess
import sys
import time

import pytest

from mixtral_jax.config import load_config
from mixtral_jax.training import cost


def _model(name, *overrides):
    return load_config(f"configs/model/{name}.yaml", list(overrides)).model


def test_tiny_flops_per_token_hand_count():
    m = load_config(None, ["model.vocab_size=100", "model.dim=16", "model.n_layers=2", "model.n_heads=4",
                           "model.n_kv_heads=2", "model.head_dim=8", "model.hidden_dim=32",
                           "model.moe.num_experts=4", "model.moe.top_k=2", "model.sliding_window=null",
                           "data.seq_len=10", "model.max_seq_len=10"]).model
    # per layer: q 16x32, k 16x16, v 16x16, o 32x16 = 512+256+256+512; 2 experts x 3 x 16x32; router 16x4
    per_layer = (512 + 256 + 256 + 512) + 2 * 3 * 16 * 32 + 16 * 4
    matmul = 2 * per_layer + 16 * 100  # + LM head; the input embedding is a lookup
    t_eff = sum(i + 1 for i in range(10)) / 10  # causal: position i sees i+1 keys
    expected = 6 * matmul + 12 * 2 * 4 * 8 * t_eff
    got = cost.flops_per_token(m, 10)
    assert got.matmul_params == matmul
    assert got.train == pytest.approx(expected)
    assert got.inference == pytest.approx(expected / 3)


def test_sliding_window_lowers_attention_only_beyond_window():
    m = _model("mistral_7b")  # window 4096
    assert cost.effective_context(2048, 4096) == cost.effective_context(2048, None)
    assert cost.flops_per_token(m, 4096).attention == pytest.approx(
        cost.flops_per_token(_model("mistral_7b", "model.sliding_window=null"), 4096).attention)
    long_windowed = cost.flops_per_token(m, 16384).attention
    long_full = cost.flops_per_token(_model("mistral_7b", "model.sliding_window=null"), 16384).attention
    assert long_windowed < 0.5 * long_full
    # hand value: 4096 positions ramp up, the other 12288 see 4096 keys each
    assert cost.effective_context(16384, 4096) == pytest.approx((4096 * 4097 / 2 + 12288 * 4096) / 16384)


def test_mistral_and_mixtral_flops_match_published_shapes():
    mistral = cost.flops_per_token(_model("mistral_7b"), 4096)
    mixtral = cost.flops_per_token(_model("mixtral_8x7b"), 4096)
    # matmul params = total - input embedding - norms (from the exact published counts)
    assert mistral.matmul_params == 7_241_732_096 - 32000 * 4096 - (2 * 32 + 1) * 4096
    assert mixtral.matmul_params == 12_879_925_248 - 32000 * 4096 - (2 * 32 + 1) * 4096
    attn = 12 * 32 * 32 * 128 * (4096 + 1) / 2
    assert mistral.train == pytest.approx(6 * mistral.matmul_params + attn)
    # "same cost as a 12.9B model": a dense model of 12.9B matmul params, same attention
    dense_12_9b = 2 * 12.9e9 + attn / 3
    assert abs(mixtral.inference / dense_12_9b - 1) < 0.05
    llama70 = cost.flops_per_token(_model("llama2_70b_shape"), 4096)
    ratio = llama70.inference / mixtral.inference
    assert 4.5 < ratio < 6.0, ratio


def test_device_hours_dollars_and_reverse():
    m = _model("mistral_7b")
    for price, dollars in ((2.0, 400_000), (2.5, 500_000)):
        plan = cost.plan_hours(m, 4096, 200_000, 312.0, 0.4, price, 1024)
        assert plan.cost_usd == pytest.approx(dollars)
        assert plan.device_hours == pytest.approx(200_000)
    plan = cost.plan_hours(m, 4096, 200_000, 312.0, 0.4, 2.0, 1)
    per_token = cost.flops_per_token(m, 4096).train
    assert plan.tokens == pytest.approx(200_000 * 3600 * 312e12 * 0.4 / per_token)
    forward = cost.plan_tokens(m, 4096, plan.tokens, 312.0, 0.4, 2.0, 8)
    assert forward.device_hours == pytest.approx(200_000)
    assert forward.days == pytest.approx(200_000 / 8 / 24)


def test_clock_pauses_and_restores():
    clock = cost.DeviceClock(num_devices=4)
    clock.start()
    time.sleep(0.05)
    clock.pause()
    time.sleep(0.1)  # e.g. an eval: not counted
    first = clock.seconds
    assert 0.05 <= first < 0.1
    resumed = cost.DeviceClock(num_devices=4, seconds=clock.state()["seconds"])
    assert resumed.device_hours == pytest.approx(first * 4 / 3600)


def test_peak_table_and_detection():
    assert cost.peak_tflops("h100") == (989.0, "table")
    assert cost.peak_tflops("a100", override=100.0) == (100.0, "config")
    assert cost.detect_hardware() == "cpu"
    with pytest.raises(ValueError, match="cost.peak_tflops"):
        cost.peak_tflops("gaudi9")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "cost", *args], capture_output=True, text=True)


def test_cost_cli_json_and_table():
    out = _cli("--config", "mistral_7b", "--device-hours", "200000", "--hardware", "a100", "--price", "2.5",
               "--mfu", "0.4", "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["cost_usd"] == pytest.approx(500_000)
    assert figures["tokens"] == pytest.approx(200_000 * 3600 * 312e12 * 0.4 / figures["train_flops_per_token"])
    table = _cli("--config", "mistral_7b", "--device-hours", "200000", "--hardware", "a100", "--price", "2")
    assert "$400,000" in table.stdout and "tokens" in table.stdout
    bad = _cli("--config", "mistral_7b", "--tokens", "1e9", "--hardware", "a1000")
    assert bad.returncode == 2 and "a1000" in bad.stderr and "Traceback" not in bad.stderr
