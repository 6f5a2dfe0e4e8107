"""EleutherAI's lm-evaluation-harness, unchanged, against the router in front of a real vLLM worker: a bundled task
(bench/lm_eval_tasks: a YAML task over a local JSONL file, no hub download) scored through `local-chat-completions`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.factories import REPO

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
TASKS = REPO / "bench" / "lm_eval_tasks"


def lm_eval(venv: Path, out: Path, model_type: str, model_args: str, tasks: str, *extra: str) -> dict[str, dict]:
    """Run lm-eval's own CLI; returns its results per task (as written to --output_path)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(venv / "bin" / "lm_eval"), "--model", model_type, "--model_args", model_args, "--tasks", tasks,
                           "--include_path", str(TASKS), "--output_path", str(out), "--limit", "4", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (results,) = list(out.rglob("results_*.json"))
    return json.loads(results.read_text())["results"]


async def test_lm_eval_chat_completions_scores_the_base_model_through_the_router(vllm_worker, router_factory, tmp_path):
    import asyncio

    from tests.tool_venvs import tool_venv

    venv = await asyncio.to_thread(tool_venv, "lm-eval", "torch==2.13.0", "lm_eval[api]")
    router = await router_factory([vllm_worker.spec], request_timeout_s=300)

    results = await asyncio.to_thread(lm_eval, venv, tmp_path / "chat-base", "local-chat-completions",
                                      f"model={MODEL},base_url={router.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
                                      "appliance_qa_gen", "--apply_chat_template")

    # Assert: lm-eval's own score came back, from answers the router forwarded
    assert results["appliance_qa_gen"]["sample_len"] == 4
    assert 0.0 <= results["appliance_qa_gen"]["exact_match,first-word"] <= 1.0
    async with httpx.AsyncClient(base_url=router.url) as c:
        metrics = (await c.get("/metrics")).text
    answered = [line for line in metrics.splitlines() if line.startswith("router_requests_total{")
                and 'route="/v1/chat/completions"' in line and f'model="{MODEL}"' in line and 'status="200"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in answered) >= 4  # one per sample
