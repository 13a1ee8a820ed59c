"""The one matplotlib setup every plot shares: a file backend, log-axis labels, finish and save.

matplotlib is optional (the `plot` extra): `pyplot()` returns None when it is missing, and each
plotting function then returns None instead of a path, so callers can say "plot skipped".

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ...
    return save(fig, path)
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend: no display needed), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def log_ticks(axis, values) -> None:
    """Label a log axis at exactly these values (matplotlib's minor labels collide)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    axis.set_ticks(list(values), [f"{v:,}" for v in values])
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def finish(ax, *, legend_size=None) -> None:
    """The house look of one axes: a light grid, and a legend when something is labelled."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)


def save(fig, path, *, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["pyplot", "log_ticks", "finish", "save"]
