"""The error every user mistake in a config becomes, and the "did you mean" hint it carries."""

from __future__ import annotations

import difflib
from typing import Sequence


class ConfigError(ValueError):
    """A user mistake in a config file or override; printed as one line by the CLI."""

    def __init__(self, message: str):
        # Messages quote user values, which may hold newlines or terminal escapes: escape every
        # non-printable character so the message stays one harmless line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """"; did you mean 'X'?" for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def require_choice(value: str, choices: Sequence[str], key: str) -> None:
    """A ConfigError naming `key` and the closest of `choices` unless `value` is one of them."""
    if value not in choices:
        raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(choices)}"
                          f"{did_you_mean(value, choices)}")
