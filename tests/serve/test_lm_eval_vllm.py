"""EleutherAI's lm-evaluation-harness, unchanged, against the router in front of a real vLLM worker: a bundled task
(bench/lm_eval_tasks: a YAML task over a local JSONL file, no hub download) scored through `local-chat-completions`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from fedllm.testing.factories import REPO

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

    from fedllm.testing.tool_venvs import tool_venv

    venv = await asyncio.to_thread(tool_venv, "lm-eval", "torch==2.13.0", "lm_eval[api]", "transformers")
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


def _served(metrics: str, route: str, model: str) -> float:
    """How many requests the router answered 200 on `route` for `model` (from its /metrics text)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("router_requests_total{")
               and f'route="{route}"' in line and f'model="{model}"' in line and 'status="200"' in line)


@pytest.mark.parametrize("target", ["base", "adapter"])
async def test_lm_eval_completions_log_likelihood_through_the_router(target, vllm_worker, router_factory, embedded_model_dir,
                                                                     embedded_lora_dir, tmp_path):
    """`local-completions` scores the multiple-choice task by log-likelihood: /v1/completions with token-id prompts,
    `echo` and `logprobs` forwarded untouched to vLLM, for the base model and for an adapter by its name."""
    import asyncio

    from fedllm.testing.tool_venvs import tool_venv

    venv = await asyncio.to_thread(tool_venv, "lm-eval", "torch==2.13.0", "lm_eval[api]", "transformers")
    router = await router_factory([vllm_worker.spec], request_timeout_s=300)
    model = MODEL
    if target == "adapter":
        model = "qa-lora"
        async with httpx.AsyncClient(base_url=router.url, timeout=300) as c:
            loaded = await c.post("/admin/adapters", json={"name": model, "path": str(embedded_lora_dir)},
                                  headers=router.admin_headers())
        assert loaded.status_code == 200, loaded.text

    results = await asyncio.to_thread(
        lm_eval, venv, tmp_path / f"mc-{target}", "local-completions",
        f"model={model},base_url={router.url}/v1/completions,tokenizer={embedded_model_dir},tokenizer_backend=huggingface,"
        "num_concurrent=1,max_retries=1", "appliance_qa_mc")

    # Assert: lm-eval's accuracy came back from log-likelihoods the router forwarded (4 questions x 4 choices)
    assert results["appliance_qa_mc"]["sample_len"] == 4
    assert 0.0 <= results["appliance_qa_mc"]["acc,none"] <= 1.0
    print(f"lm-eval appliance_qa_mc via local-completions, {model}: acc {results['appliance_qa_mc']['acc,none']:.3f}")
    async with httpx.AsyncClient(base_url=router.url) as c:
        metrics = (await c.get("/metrics")).text
    assert _served(metrics, "/v1/completions", model) >= 4
