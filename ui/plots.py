"""Line and bar charts for the console, drawn with matplotlib (an image: the same picture on every page load).

Line charts take long tables (x, y, series). `matplotlib.figure.Figure` is used directly, not pyplot, so no figure
is kept in a global registry between the console's refreshes.
"""

from __future__ import annotations

from typing import Any

PALETTE = ["#1d4ed8", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"]


def _titled_figure(title: str, size_in: tuple[float, float]) -> tuple[Any, Any]:
    """A new figure (100 dpi, constrained layout) with one titled axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    return fig, ax


def _say_empty(fig: Any, ax: Any, text: str) -> Any:
    """`fig` with `text` in the middle of its axes and no ticks (nothing to plot yet)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def line_figure(
    frame: Any,
    x: str,
    y: str,
    title: str,
    colors: dict[str, str] | None = None,
    *,
    empty_text: str = "No data yet",
    size_in: tuple[float, float] = (10.0, 3.0),
) -> Any:
    """A figure with one line per `series` of `frame` (pandas DataFrame with columns x, y, series).

    Args:
        colors: fixed colours for known series; other series take the palette in order.
        size_in: figure width and height in inches (100 dpi).
    """
    from matplotlib.ticker import MaxNLocator

    fig, ax = _titled_figure(title, size_in)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if frame.empty:
        return _say_empty(fig, ax, empty_text)
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


def bar_figure(
    labels: list[str],
    values: list[float],
    title: str,
    ylabel: str,
    colors: dict[str, str] | None = None,
    *,
    empty_text: str = "No data yet",
    size_in: tuple[float, float] = (8.0, 3.0),
) -> Any:
    """A figure with one labelled bar per value (in order).

    Args:
        colors: fixed colours for known labels; the others take the palette's first colour.
    """
    fig, ax = _titled_figure(title, size_in)
    ax.set_ylabel(ylabel)
    if not values:
        return _say_empty(fig, ax, empty_text)
    bars = ax.bar(range(len(values)), values, color=[(colors or {}).get(label, PALETTE[0]) for label in labels])
    ax.set_xticks(range(len(values)), labels)
    ax.bar_label(bars, fmt="%.4f", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    return fig


def stacked_bar_figure(
    rows: list[tuple[str, dict[str, float]]],
    parts: list[str],
    title: str,
    xlabel: str,
    *,
    empty_text: str = "No data yet",
    size_in: tuple[float, float] = (6.0, 2.6),
) -> Any:
    """Horizontal bars, one per row label, each stacked from `parts` in order (a missing part counts 0).

    Args:
        rows: (label, {part: value}) from top to bottom.
        parts: the stack's segments, left to right; each takes the palette's next colour.
    """
    fig, ax = _titled_figure(title, size_in)
    if not rows:
        return _say_empty(fig, ax, empty_text)
    labels = [label for label, _ in rows]
    left = [0.0] * len(rows)
    for part, colour in zip(parts, PALETTE):
        widths = [float(values.get(part) or 0.0) for _, values in rows]
        ax.barh(labels, widths, left=left, color=colour, label=part, height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()  # the first row on top
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False, ncols=len(parts))
    return fig
