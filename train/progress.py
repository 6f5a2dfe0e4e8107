"""A terminal progress bar for training: step, loss, tokens/s and time left (rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(console: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield a `progress` callback for `fit_adapter` that drives a rich progress bar on `console`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s  eta {task.fields[eta]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"), tps=0.0, eta="?")

        def on_step(record: dict[str, Any]) -> None:
            eta = int(record.get("eta_s", 0))
            bar.update(task, total=record["total_steps"], completed=record["step"], loss=record["loss"],
                       tps=record["tokens_per_s"], eta=f"{eta // 60}m{eta % 60:02d}s")

        yield on_step
