"""Host allocator settings that keep a training step's temporary buffers in reused memory.

XLA:CPU allocates each step's temporaries as one block (490 MB for the benchmark's dense trunk,
1.1 GB for its MoE version) with malloc, which serves blocks above 32 MB with a fresh mmap and
returns them with munmap. Every step then page-faults its temporaries back in, and the kernel
zeroes each page first: measured 120k faults and 0.28 s of system time per 1.0 s dense step on
2 cores. glibc's tunables can keep freed memory in the heap instead: no mmap for large blocks,
no trimming of the heap top, one arena (a worker thread's own arena would still mmap blocks
larger than its 64 MB heaps). Then the faults per step are 0 and the dense step takes ~0.87x
the time (`benchmarks/train_step.py`, which applies the same settings to the PyTorch peer).

GLIBC_TUNABLES is read only when a process starts, so the `mixtral-jax` command re-executes
itself once with it set. It does nothing off glibc Linux, when GLIBC_TUNABLES is already set
(your own settings win), or when MIXTRAL_JAX_SYSTEM_MALLOC=1. The cost: the process keeps its
peak heap until it exits, which a training process reaches anyway.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
OPT_OUT = "MIXTRAL_JAX_SYSTEM_MALLOC"


def wanted() -> bool:
    """Whether this process should be restarted with TUNABLES."""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get(OPT_OUT, "") in ("", "0"))


def reexec_with_tunables() -> None:
    """Replace this process with the same command line and GLIBC_TUNABLES=TUNABLES (once: the new
    process has it set). Call before anything else: nothing of this process survives."""
    if wanted():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": TUNABLES})
