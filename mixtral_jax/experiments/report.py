"""Writing an experiment's report: markdown tables and matplotlib PNGs (headless)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and half the range (max - min) / 2 over seeds; None where nothing was measured."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def pm(values: Sequence[float | None], spec: str = ".4f") -> str:
    mean, spread = mean_spread(values)
    if mean is None:
        return "n/a"
    return f"{mean:{spec}}" + (f" ± {spread:{spec}}" if len(values) > 1 else "")


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """Subplots [nrows][ncols], each about `size` inches; constrained layout keeps titles,
    colorbars and legends inside the figure."""
    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                        layout="constrained")


def save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(path: Path, sections: Sequence[str]) -> Path:
    path.write_text("\n\n".join(s.strip() for s in sections) + "\n")
    return path
