"""The host allocator settings `mixtral-jax` restarts itself with: applied once, skipped on opt-out,
and doing what they are for, measured as page faults of a large block allocated, touched and
freed three times (what XLA:CPU does with each step's temporaries)."""

import os
import platform
import subprocess
import sys

import pytest

from mixtral_jax import host_allocator

PROBE = """
import resource, numpy as np
from mixtral_jax.host_allocator import reexec_with_tunables
reexec_with_tunables()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(256 * 2**20, np.uint8)
    block[::4096] = 1  # touch every page
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
import os
print(os.environ.get("GLIBC_TUNABLES"), faults[1], faults[2])
"""


def _probe(**env_changes) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_allocator.OPT_OUT)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    tunables, second, third = out.stdout.split()
    return tunables, int(second), int(third)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="needs glibc Linux (the settings are glibc tunables)")
def test_restart_sets_tunables_and_freed_blocks_are_reused_without_faults():
    tunables, second, third = _probe()
    assert tunables == host_allocator.TUNABLES
    assert second < 20 and third < 20, (second, third)  # reused heap pages: no fresh page to fault in
    tunables, second, third = _probe(**{host_allocator.OPT_OUT: "1"})
    assert tunables == "None"  # opted out: no restart
    assert min(second, third) >= 100, (second, third)  # each round maps and faults in a fresh block
