"""Line and bar charts for the console, drawn with matplotlib (an image: the same picture on every page load).

Line charts take long tables (x, y, series). `matplotlib.figure.Figure` is used directly, not pyplot, so no figure
is kept in a global registry between the console's refreshes.
"""

from __future__ import annotations

from typing import Any

PALETTE = ["#1d4ed8", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"]


def line_figure(frame: Any, x: str, y: str, title: str, colors: dict[str, str] | None = None, *, empty_text: str = "No data yet",
                size_in: tuple[float, float] = (10.0, 3.0)) -> Any:
    """A figure with one line per `series` of `frame` (pandas DataFrame with columns x, y, series).

    Args:
        colors: fixed colours for known series; other series take the palette in order.
        size_in: figure width and height in inches (100 dpi).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=size_in, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if frame.empty:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    names = list(dict.fromkeys(frame["series"]))
    spare = iter(c for c in PALETTE if c not in (colors or {}).values())
    for name in names:
        part = frame[frame["series"] == name].sort_values(x)
        colour = (colors or {}).get(name) or next(spare, None)
        marker = "o" if len(part) <= 12 else None
        ax.plot(part[x], part[y], label=name, color=colour, marker=marker, markersize=3, linewidth=1.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
    ax.legend(loc="upper right", fontsize=9, frameon=False)
    return fig


def bar_figure(labels: list[str], values: list[float], title: str, ylabel: str, colors: dict[str, str] | None = None, *,
               empty_text: str = "No data yet", size_in: tuple[float, float] = (8.0, 3.0)) -> Any:
    """A figure with one labelled bar per value (in order).

    Args:
        colors: fixed colours for known labels; the others take the palette's first colour.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    if not values:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    bars = ax.bar(range(len(values)), values, color=[(colors or {}).get(label, PALETTE[0]) for label in labels])
    ax.set_xticks(range(len(values)), labels)
    ax.bar_label(bars, fmt="%.4f", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    return fig
