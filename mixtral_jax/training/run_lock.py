"""Claiming a run directory before a trainer writes to it or compiles anything.

Two trainers on one run dir would interleave checkpoints and metrics, so the first holds an
exclusive `fcntl.flock` on `RUN/.lock` for as long as it trains; the lock file records its PID
and host so the second can say who holds it. The kernel drops a flock when its process dies
(even by `kill -9`), so a crash never leaves the run dir locked: a lock file that still names a
PID but whose flock is free is stale and is taken over, with a note.

A probe write then checks that the directory can be written at all (permissions, a full disk,
a read-only mount) so that failure is reported now instead of at the first checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from mixtral_jax.config import ConfigError

LOCK_NAME = ".lock"
PROBE_NAME = ".write_probe"
PROBE_BYTES = 64 * 1024  # enough that a nearly full disk fails the probe, not a checkpoint


class RunLock:
    """Exclusive ownership of one run directory; `acquire()` raises ConfigError naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file: IO[str] | None = None
        self.note: str | None = None  # a stale lock taken over, or locking unsupported here

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> "RunLock":
        if self._file is not None:
            return self
        # "a+" creates the file without truncating it: the holder's PID must stay readable.
        try:
            lock_file = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"run directory {self.run_dir} is not writable ({_describe(err)})") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(lock_file)
            lock_file.close()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without locks (some network mounts) should not stop training.
                self.note = (f"warning: cannot lock {self.path} ({err.strerror}); a second trainer on this run "
                             "directory would not be detected")
                return self
            who = (f"PID {holder.get('pid')} on host {holder.get('host')}" if holder.get("pid")
                   else "a process that has not recorded its PID yet")
            raise ConfigError(f"run directory {self.run_dir} is in use by another trainer ({who}, lock file "
                              f"{self.path}); wait for it to finish or stop it, or pick another run.name") from None
        previous = _read_holder(lock_file)
        if previous.get("pid"):
            # A clean release empties the file, so a recorded PID means that trainer died holding it.
            self.note = (f"took over the stale lock {self.path} left by PID {previous.get('pid')} on host "
                         f"{previous.get('host')} (that process is gone)")
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        lock_file.flush()
        self._file = lock_file
        return self

    def release(self) -> None:
        """Empty the file (so the next trainer sees no stale holder) and drop the flock. The file
        itself stays: deleting it would let two processes lock two different inodes."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
        with contextlib.suppress(OSError):
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _read_holder(lock_file: IO[str]) -> dict:
    with contextlib.suppress(OSError, ValueError):
        lock_file.seek(0)
        text = lock_file.read().strip()
        if text:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
    return {}


def probe_writable(directory: Path, name: str = PROBE_NAME) -> None:
    """Create, write, fsync and delete a small file in `directory`; ConfigError if any step fails."""
    path = Path(directory) / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise ConfigError(f"run directory {directory} is not writable ({_describe(err)}); checkpoints and metrics "
                          "could not be saved: free disk space or fix its permissions first") from None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def claim_run_dir(run_dir: Path, *, primary: bool, probe_name: str = PROBE_NAME) -> RunLock:
    """Create the run dir, lock it (the primary process only: the processes of one job share
    it) and probe that it is writable. Returns the held lock (not held on other processes)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory {run_dir} ({_describe(err)})") from None
    lock = RunLock(run_dir)
    if primary:
        lock.acquire()
    try:
        probe_writable(run_dir, probe_name)
    except BaseException:
        lock.release()
        raise
    return lock


def _describe(err: OSError) -> str:
    return f"[Errno {err.errno}] {err.strerror}" if err.errno else str(err)
