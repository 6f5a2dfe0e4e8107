"""A terminal progress bar for training: step, loss, tokens/s and time left (rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(console: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield a `progress` callback for `fit_adapter` that drives a rich progress bar on `console`.

    The bar appears at the first step, so validation errors and loading messages print on a clean terminal.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state: dict[str, Any] = {}

    def on_step(record: dict[str, Any]) -> None:
        if "bar" not in state:
            bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
                TimeRemainingColumn(),
                console=console,
            )
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(
                "train", total=record["total_steps"], completed=record["step"] - 1, loss=record["loss"], tps=0.0
            )
        state["bar"].update(
            state["task"],
            total=record["total_steps"],
            completed=record["step"],
            loss=record["loss"],
            tps=record["tokens_per_s"],
        )

    try:
        yield on_step
    finally:
        if "bar" in state:
            state["bar"].stop()
