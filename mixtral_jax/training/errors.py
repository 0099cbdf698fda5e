"""The one error type for a run that cannot go on through no fault of its config (a damaged
checkpoint, non-finite training, a full disk). It is a ValueError so the CLI prints it as one
line and exits 2, like a ConfigError, instead of a traceback."""

from __future__ import annotations


class RunError(ValueError):
    """A training run stopped (or refused to start) for the reason in the message."""
