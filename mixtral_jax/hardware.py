"""The one hardware table: every accelerator the framework knows by name, how jax names it,
its dense bf16 peak and its memory. Cost accounting (`training/cost.py`), the memory planner
(`training/memory.py`), config validation (`cost.hardware`) and the CLI's help all read it, so
adding a device is one row here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Hardware:
    name: str  # what configs and the CLI call it
    device_kinds: tuple[str, ...]  # lower-case substrings of jax's `device_kind` that identify it
    peak_tflops: Optional[float]  # dense bf16, no sparsity (vendor data sheets); None = measured
    memory_gib: Optional[float]  # per device, as sold; None = host memory, not planned for


# Rows are matched against `device_kind` in order, so a more specific row comes first.
HARDWARE: tuple[Hardware, ...] = (
    Hardware("a100-40gb", ("a100-sxm4-40gb", "a100-pcie-40gb"), 312.0, 40),
    Hardware("a100", ("a100",), 312.0, 80),
    Hardware("h100", ("h100",), 989.0, 80),  # SXM
    Hardware("h200", ("h200",), 989.0, 141),
    Hardware("b200", ("b200",), 2250.0, 180),
    Hardware("tpu-v4", ("tpu v4",), 275.0, 32),
    Hardware("tpu-v5e", ("tpu v5 lite", "tpu v5e"), 197.0, 16),
    Hardware("tpu-v5p", ("tpu v5",), 459.0, 95),
    Hardware("trillium", ("tpu v6",), 918.0, 32),  # TPU v6e
    Hardware("cpu", ("cpu",), None, None),  # peak measured at run time (training/cost.py)
)
BY_NAME: dict[str, Hardware] = {h.name: h for h in HARDWARE}
# What `cost.hardware` accepts: every row, or `auto` (detect the device the run is on).
HARDWARE_CHOICES: tuple[str, ...] = ("auto", *BY_NAME)
# What the memory planner can say "fits" or "does not fit" of.
ACCELERATORS: tuple[str, ...] = tuple(h.name for h in HARDWARE if h.memory_gib is not None)


def from_device_kind(device_kind: str) -> Optional[Hardware]:
    """The row whose device-kind substrings match jax's `device_kind`, or None."""
    kind = device_kind.lower()
    for row in HARDWARE:
        if any(needle in kind for needle in row.device_kinds):
            return row
    return None
