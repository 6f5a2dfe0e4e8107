"""Inference: the OpenAI-compatible router in front of vLLM workers (see DESIGN.md, "Router").

`create_app(settings)` builds the router app, `run_router(settings)` serves it. A fast fake worker for tests and
benchmarks lives outside the product, in `fedllm.testing.fake_vllm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app", "run_router"]

if TYPE_CHECKING:
    from fedllm.serve.app import create_app, run_router


def __getattr__(name: str) -> Any:
    # Lazy, so `import serve` (and `fedllm.serve.worker_launcher`) stay cheap.
    if name in __all__:
        from fedllm.serve import app

        return getattr(app, name)
    raise AttributeError(name)
