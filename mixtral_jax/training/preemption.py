"""Graceful stops: SIGINT / SIGTERM ask the loop to finish its step, checkpoint, and exit.

A signal handler only sets a flag, because interrupting the Python thread inside a jitted
call with donated buffers would leave no consistent state to save. A second signal stops
at once (the last completed checkpoint is still intact, orbax commits atomically).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Context manager: `with StopRequest() as stop: ... if stop.requested: ...`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # second signal: the user really wants out now
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
