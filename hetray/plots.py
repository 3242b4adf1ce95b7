"""Plots: matplotlib without a display (the Agg backend, chosen once here) and one save helper.

Every report (training loss, selection, evaluation, Tune) draws with ``figure(...)`` and writes
with ``save(fig, path)``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5.5, 4)):
    """(fig, axes): ``axes`` is a rows x cols array, even for one panel."""
    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save(fig, path: str | Path, dpi: int = 110, title: str | None = None) -> Path:
    """Lay out, write a PNG and free the figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
