"""The first request to a worker that joined after a promotion: with the promoted version loaded ahead
(`serve.replicate_promoted: true`, the default) and without (the load on the request path), on real vLLM (CPU).

    flock /tmp/heavy.lock .venv/bin/python bench/promoted_first_request.py          # ~3 min
    .venv/bin/python bench/promoted_first_request.py --reps 5

Two real workers started the appliance's way (`fedllm.serve.worker_launcher.VLLMWorker`: gate + vLLM) on the embedded
SmolLM2-135M; a LoRA (r=8 on q/k/v/o) made with peft. Each repetition, for each setting: a fresh router with the first
worker (static) publishes a new adapter name with an alias; the second joins (its `max_loras` declared); the router
is given the time a health interval takes; the static worker is drained; the client times its first request for the
alias (chat, 4 tokens, temperature 0), which only the joiner can answer. The router's load counter says where the
load happened.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE = REPO / ".cache"


def _lora(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).save_pretrained(out)
    return out


async def _one(settings_for, trusted, joining, lora: Path, model: str, name: str, replicate: bool) -> tuple[float, dict]:
    import httpx
    import uvicorn

    from fedllm.serve import create_app
    from fedllm.testing.factories import free_port

    port = free_port()
    app = create_app(settings_for(port, replicate))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    admin = {"Authorization": f"Bearer {app.state.admin_token}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            r = await c.post("/admin/adapters", json={"name": name, "path": str(lora), "aliases": [f"{name}-latest"],
                                                      "base_model": model}, headers=admin)
            r.raise_for_status()
            trusted_id = r.json()["workers"][0]
            joined = await c.post("/admin/workers", json={"url": joining.url, "api_key": joining.api_key, "max_loras": 2},
                                  headers={"Authorization": f"Bearer {app.state.join_token}"})
            joined.raise_for_status()
            await asyncio.sleep(2.0)  # what a health interval gives the keeper (loads take well under that here)
            (await c.post(f"/admin/workers/{trusted_id}/drain", headers=admin)).raise_for_status()
            body = {"model": f"{name}-latest", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
            started = time.perf_counter()
            answer = await c.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - started
            answer.raise_for_status()
            loads = next(a for a in (await c.get("/admin/adapters", headers=admin)).json() if a["name"] == name)["loads"]
            await c.delete(f"/admin/adapters/{name}", headers=admin)
        return elapsed, loads
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def _direct_load_ms(worker, lora: Path, name: str) -> float:
    """Milliseconds of one load of `lora` as `name` straight on `worker` (then unloaded)."""
    import httpx

    headers = {"Authorization": f"Bearer {worker.api_key}"}
    started = time.perf_counter()
    httpx.post(f"{worker.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(lora)}, headers=headers,
               timeout=300).raise_for_status()
    elapsed = (time.perf_counter() - started) * 1000
    httpx.post(f"{worker.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers, timeout=60)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="Repetitions per setting (alternating).")
    args = parser.parse_args()

    from fedllm.core.model_store import prepare_model
    from fedllm.core.sections.serve import WorkerSettings
    from fedllm.serve.worker_launcher import VLLMWorker
    from fedllm.testing.factories import free_port, make_settings

    model_dir = prepare_model(CACHE / "test-home" / "models", cache_dir=CACHE / "wheels").path
    tmp = Path(tempfile.mkdtemp(prefix="bench-promoted-"))
    lora = _lora(model_dir, tmp / "lora")
    cfg = WorkerSettings(kv_cache_gib=1, max_model_len=2048, max_lora_rank=16, max_loras=2, startup_timeout_s=400)
    workers = [VLLMWorker(cfg, model_dir, model_dir.name, free_port(), tmp, api_key=secrets.token_urlsafe(24)) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        trusted, joining = workers

        def settings_for(port: int, replicate: bool):
            spec = {"url": trusted.url, "region": "local", "api_key": trusted.api_key, "max_loras": 2}
            return make_settings(tmp / f"home-{port}", serve={"workers": [spec], "port": port, "health_interval_s": 1.0,
                                                              "request_timeout_s": 300, "place_adapters_on_joined": True,
                                                              "canary_prompts": 0, "replicate_promoted": replicate})

        results: dict[bool, list[tuple[float, dict]]] = {True: [], False: []}
        for rep in range(args.reps):
            for replicate in (True, False):
                name = f"bench-{'ahead' if replicate else 'demand'}-{rep}"
                results[replicate].append(asyncio.run(_one(settings_for, trusted, joining, lora, model_dir.name, name, replicate)))
        direct = [_direct_load_ms(joining, lora, f"bench-direct-{i}") for i in range(args.reps)]
        print(f"a direct /v1/load_lora_adapter on the joiner: {', '.join(f'{t:.0f}' for t in direct)} ms")
        for replicate, rows in results.items():
            times = [t for t, _ in rows]
            label = "loaded ahead (replicate_promoted: true) " if replicate else "on demand (replicate_promoted: false)"
            print(f"{label}: first request to the joiner median {statistics.median(times) * 1000:.0f} ms "
                  f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms); loads {[l for _, l in rows]}")
    finally:
        for w in workers:
            w.stop()


if __name__ == "__main__":
    main()
