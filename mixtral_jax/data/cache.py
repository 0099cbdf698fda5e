"""Where the package caches what it builds (corpora, tokenizers), and the lock that makes
concurrent processes build each entry once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Root of everything this package caches (`MIXTRAL_JAX_CACHE`, else ~/.cache/mixtral_jax)."""
    root = os.environ.get("MIXTRAL_JAX_CACHE") or Path.home() / ".cache" / "mixtral_jax"
    return Path(root).expanduser()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes (hosts, test workers) build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
