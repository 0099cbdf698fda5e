"""What a run costs: model FLOPs per token (PaLM appendix B), device peaks, MFU, a
device-hour stopwatch that survives resumes, and the planner behind `mixtral-jax cost`.

Model FLOPs count the matmuls a token touches, not what an implementation happens to run
(remat recomputation and a dense-dispatch MoE's wasted expert work are excluded), so MFU
compares runs fairly across implementations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mixtral_jax.config import ModelConfig
from mixtral_jax.hardware import BY_NAME, from_device_kind

MAX_DEVICES = 2**31 - 1  # a bound no cluster reaches; keeps float conversions of counts exact


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token = 6 * matmul params + attention; inference is a third."""

    matmul_params: int  # parameters in matmuls one token passes through (active experts only)
    attention: float  # 12 * L * H * Dh * T_eff
    effective_context: float  # T_eff: mean positions a token attends to

    @property
    def train(self) -> float:
        return 6.0 * self.matmul_params + self.attention

    @property
    def inference(self) -> float:
        return self.train / 3.0


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Attention projections, the FFN a token uses, and the LM head. A sparse layer's FFN is the
    router, k routed experts and the shared experts (with their gate); a dense layer's, the
    dense MLP. The input embedding is a lookup, not a matmul, so it is not counted (tied or not)."""
    attention = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    dense_ffn = 3 * cfg.dim * cfg.hidden_dim
    moe = cfg.moe
    sparse_ffn = (moe.top_k * 3 * cfg.dim * cfg.expert_width + cfg.dim * moe.num_experts
                  + 3 * cfg.dim * cfg.shared_width + (cfg.dim if moe.shared_gate else 0))
    n_sparse = cfg.n_sparse_layers
    ffn = n_sparse * sparse_ffn + (cfg.n_layers - n_sparse) * dense_ffn
    return cfg.n_layers * attention + ffn + cfg.dim * cfg.vocab_size


def effective_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to over a causal sequence of `seq_len` tokens:
    position i sees min(i + 1, window) keys."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2.0
    # positions 0..W-1 see i+1 keys, the remaining T-W see W keys
    return (window * (window + 1) / 2.0 + (seq_len - window) * window) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsPerToken:
    t_eff = effective_context(seq_len, cfg.sliding_window)
    attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t_eff
    return FlopsPerToken(matmul_params_per_token(cfg), attention, t_eff)


def detect_hardware() -> str:
    """Our name for jax.devices()[0], or the raw device_kind if it is not in the table."""
    import jax

    kind = jax.devices()[0].device_kind
    row = from_device_kind(kind)
    return row.name if row is not None else kind.lower()


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, reps: int = 5) -> float:
    """TFLOP/s of a large square matmul on the default device: the practical peak of a CPU
    (which has no data-sheet figure for JAX's kernels)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e12


def peak_tflops(hardware: str, override: float | None = None, dtype: str = "float32") -> tuple[float, str]:
    """Per-device peak and where the figure comes from ('config', 'table' or 'measured')."""
    if override is not None:
        return float(override), "config"
    if hardware == "auto":
        hardware = detect_hardware()
    row = BY_NAME.get(hardware)
    if row is not None and row.peak_tflops is not None:
        return row.peak_tflops, "table"
    if row is not None:  # no data-sheet figure (a CPU): measure it
        return measure_matmul_peak(dtype), "measured"
    raise ValueError(f"no peak TFLOP/s known for hardware '{hardware}'; set cost.peak_tflops")


class DeviceClock:
    """A stopwatch of device time that pauses (compile, eval, checkpoint waits excluded) and
    whose total is saved in checkpoints, so device-hours and dollars survive a resume."""

    def __init__(self, num_devices: int, seconds: float = 0.0):
        self.num_devices = num_devices
        self.seconds = seconds  # wall seconds while running (not yet x devices)
        self._since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    @property
    def running_seconds(self) -> float:
        extra = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.seconds + extra

    @property
    def device_hours(self) -> float:
        return self.running_seconds * self.num_devices / 3600.0

    def state(self) -> dict:
        return {"seconds": self.running_seconds}


@dataclass(frozen=True)
class Plan:
    """A token budget on given hardware: FLOPs, device-hours, days on N devices, dollars."""

    train_flops_per_token: float
    inference_flops_per_token: float
    tokens: float
    total_flops: float
    peak_tflops: float
    mfu: float
    device_hours: float
    devices: int
    days: float
    price_per_device_hour: float
    cost_usd: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_number(label: str, value: float, *, allow_zero: bool = False, at_most: float = math.inf) -> float:
    """`value` if it is a finite number > 0 (>= 0 with `allow_zero`) and <= `at_most`, else a
    one-line ValueError naming `label`. NaN fails every comparison, so `not value > 0` alone
    would let it through a check written the other way round: it is tested explicitly."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # ints are exact at any size; only floats can be NaN or inf
    finite = number and (isinstance(value, int) or math.isfinite(value))
    low_ok = finite and (value >= 0 if allow_zero else value > 0)
    if not (low_ok and value <= at_most):
        low = ">= 0" if allow_zero else "> 0"
        high = f" and at most {at_most:,}" if at_most != math.inf else ""
        raise ValueError(f"{label} must be a finite number {low}{high}, got {value}")
    return value


def _check_plan_inputs(seq_len: int, peak: float, mfu: float, price: float, devices: int) -> None:
    check_number("seq_len", seq_len)
    check_number("peak TFLOP/s", peak)
    check_number("MFU", mfu, at_most=1.0)
    check_number("price per device-hour", price, allow_zero=True)
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"devices must be a whole number from 1 to {MAX_DEVICES}, got {devices}")


def plan_tokens(cfg: ModelConfig, seq_len: int, tokens: float, peak: float, mfu: float, price: float,
                devices: int) -> Plan:
    """Forward: what training on `tokens` costs at an assumed MFU. Closed-form arithmetic, so a
    huge budget answers as fast as a small one; one that overflows a float is refused."""
    check_number("tokens", tokens)
    _check_plan_inputs(seq_len, peak, mfu, price, devices)
    per_token = flops_per_token(cfg, seq_len)
    total = per_token.train * tokens
    device_hours = total / (peak * 1e12 * mfu) / 3600.0
    cost_usd = device_hours * price
    if not all(math.isfinite(x) for x in (total, device_hours, cost_usd)):
        raise ValueError(f"tokens ({tokens:g}) is too large: the totals overflow a float")
    return Plan(per_token.train, per_token.inference, tokens, total, peak, mfu, device_hours, devices,
                device_hours / devices / 24.0, price, cost_usd)


def plan_hours(cfg: ModelConfig, seq_len: int, device_hours: float, peak: float, mfu: float, price: float,
               devices: int) -> Plan:
    """Reverse: how many training tokens `device_hours` buy at an assumed MFU."""
    check_number("device-hours", device_hours)
    _check_plan_inputs(seq_len, peak, mfu, price, devices)
    per_token = flops_per_token(cfg, seq_len)
    tokens = device_hours * 3600.0 * peak * 1e12 * mfu / per_token.train
    if not math.isfinite(tokens) or tokens == 0:
        raise ValueError(f"device-hours ({device_hours:g}) is out of range: the token count is {tokens:g}")
    return plan_tokens(cfg, seq_len, tokens, peak, mfu, price, devices)
