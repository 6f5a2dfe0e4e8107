"""The Gradio console (README.md, "The console"). It talks to the services over HTTP and reads the state folder.

Gradio is imported only when the console is built, so `import fedllm.ui` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_console", "launch_console"]


def build_console(settings: Any, ctx: Any = None) -> Any:
    """See `fedllm.ui.app.build_console`."""
    from fedllm.ui.app import build_console as _build

    return _build(settings, ctx)


def launch_console(settings: Any, *, host: str | None = None, port: int | None = None) -> None:
    """See `fedllm.ui.app.launch_console`."""
    from fedllm.ui.app import launch_console as _launch

    _launch(settings, host=host, port=port)
