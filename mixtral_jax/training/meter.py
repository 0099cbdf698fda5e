"""Live cost accounting of a training run: throughput, model TFLOP/s, MFU, device-hours,
dollars, and the projection to `train.steps`. The device clock runs only while training
steps run (compile and eval are excluded) and its total is checkpointed."""

from __future__ import annotations

import jax

from mixtral_jax.config import Config
from mixtral_jax.training.cost import DeviceClock, detect_hardware, flops_per_token, peak_tflops


def accounted_devices() -> int:
    """Devices that are billed. Host-platform CPU "devices" are slices of one machine whose
    peak is measured as a whole, so a CPU run counts one device per process."""
    if jax.devices()[0].platform == "cpu":
        return jax.process_count()
    return jax.device_count()


class RunMeter:
    def __init__(self, cfg: Config, clock_seconds: float = 0.0):
        hardware = detect_hardware() if cfg.cost.hardware == "auto" else cfg.cost.hardware
        self.hardware = hardware
        self.peak, self.peak_source = peak_tflops(hardware, cfg.cost.peak_tflops, cfg.model.dtype)
        self.flops = flops_per_token(cfg.model, cfg.data.seq_len)
        self.devices = accounted_devices()
        self.clock = DeviceClock(self.devices, clock_seconds)
        self.price = cfg.cost.price_per_device_hour
        self.total_steps = cfg.train.steps
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self._mfu_sum = 0.0
        self._mfu_count = 0

    def window(self, steps: int, elapsed_s: float, done: int) -> dict[str, float]:
        """Metrics for `steps` steps that took `elapsed_s` of wall time, ending at step `done`."""
        tokens_per_s = steps * self.tokens_per_step / elapsed_s
        tflops = tokens_per_s * self.flops.train / 1e12
        mfu = tflops / (self.peak * self.devices)
        self._mfu_sum += mfu * steps
        self._mfu_count += steps
        hours = self.clock.device_hours
        remaining_hours = (self.total_steps - done) * (elapsed_s / steps) * self.devices / 3600.0
        return {
            "step_time_s": elapsed_s / steps,
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": tflops,
            "mfu": mfu,
            "device_hours": hours,
            "cost_usd": hours * self.price,
            "projected_device_hours": hours + remaining_hours,
            "projected_cost_usd": (hours + remaining_hours) * self.price,
        }

    def totals(self, steps: int) -> dict[str, float | str | None]:
        tokens = steps * self.tokens_per_step
        hours = self.clock.device_hours
        return {
            "tokens": tokens,
            "train_flops_per_token": self.flops.train,
            "model_flops": tokens * self.flops.train,
            "device_hours": hours,
            "cost_usd": hours * self.price,
            "mean_mfu": self._mfu_sum / self._mfu_count if self._mfu_count else None,
            "hardware": self.hardware,
            "peak_tflops": self.peak,
            "peak_source": self.peak_source,
        }
