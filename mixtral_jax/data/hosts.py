"""The train iterator's state across processes, for checkpoints.

Each process reads only its own rows (pipeline.py), so each has its own iterator state, but a
checkpoint's JSON items are written by the primary process alone. `gather_states` collects every
process's state into one object (a collective: every process calls it at the same step) and
`local_state` hands each process its own back on resume, so a multi-host run also resumes
exactly. A state saved by a single process passes through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def gather_states(state: Any) -> Any:
    """{"processes": [state of process 0, 1, ...]} in a multi-process run, else `state`."""
    import jax

    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return {"processes": [json.loads(bytes(blobs[i, :sizes[i]])) for i in range(len(sizes))]}


def local_state(saved: Any) -> Any:
    """This process's part of a gathered state (or a single process's state as it is)."""
    import jax

    if not (isinstance(saved, dict) and "processes" in saved):
        return saved
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint's data state comes from {len(states)} processes, this run has "
                         f"{jax.process_count()}; resume with the same number of processes")
    return states[jax.process_index()]
