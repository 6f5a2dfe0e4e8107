"""The vLLM worker launcher: its command line and environment, readiness, failure reports, stopping; real vLLM last."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedllm.core.cores import divide_cores
from fedllm.core.errors import ConfigError
from fedllm.core.sections.serve import WorkerSettings
from fedllm.serve.worker_launcher import (
    VLLMWorker,
    WorkerStartError,
    vllm_command,
    vllm_env,
)
from fedllm.testing.factories import REPO, free_port

FAKE_SERVICE = REPO / "tests" / "appliance" / "fake_service.py"


def _fake_worker(tmp_path: Path, *extra: str, model: str = "m") -> VLLMWorker:
    """A VLLMWorker whose command is the tiny fake service instead of vLLM (same readiness protocol), behind the
    worker's gate like vLLM (on a private loopback port instead of vLLM's socket)."""
    worker = VLLMWorker(WorkerSettings(startup_timeout_s=20), tmp_path, model, free_port(), tmp_path / "logs")
    private = free_port()
    worker.upstream = f"http://127.0.0.1:{private}"
    worker.argv = [sys.executable, str(FAKE_SERVICE), "--port", str(private), "--model", model, *extra]
    return worker


def test_cpu_command_enables_lora_without_gpu_flags():
    cfg = WorkerSettings(max_model_len=1024, max_lora_rank=8, max_loras=3, extra_args=["--seed", "1"])

    argv = vllm_command(cfg, Path("/models/m"), "m", 8123, device="cpu")

    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::1], argv[4::1]))
    assert flags["--model"] == "/models/m" and flags["--served-model-name"] == "m"
    assert flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert "--uds" not in argv
    assert flags["--max-model-len"] == "1024" and flags["--max-lora-rank"] == "8" and flags["--max-loras"] == "3"
    assert "--enable-lora" in argv
    assert "--tensor-parallel-size" not in argv and "--gpu-memory-utilization" not in argv
    assert argv[-2:] == ["--seed", "1"]


def test_cuda_command_adds_gpu_flags():
    cfg = WorkerSettings(tensor_parallel_size=2, gpu_memory_utilization=0.5)

    argv = vllm_command(cfg, Path("/m"), "m", 1, device="cuda")

    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.5"


def test_model_parallel_settings_reach_vllm_on_any_device():
    # Arrange: a model split in 2 tensor-parallel shards x 2 pipeline stages across a Ray cluster.
    cfg = WorkerSettings(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray")

    # Act
    gpu, cpu = vllm_command(cfg, Path("/m"), "m", 1, device="cuda"), vllm_command(cfg, Path("/m"), "m", 1, device="cpu")

    # Assert
    for argv in (gpu, cpu):
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
        assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert "--pipeline-parallel-size" not in vllm_command(WorkerSettings(), Path("/m"), "m", 1, device="cuda")


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="tpu"):
        vllm_command(WorkerSettings(), Path("/m"), "m", 1, device="tpu")


def test_env_allows_runtime_lora_and_sets_whole_gib_kv_cache_on_cpu():
    env = vllm_env(WorkerSettings(kv_cache_gib=1.5), "cpu", base={})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM parses an int; round up rather than fail
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_env(WorkerSettings(), "cuda", base={})


def test_cpu_model_parallel_ranks_get_their_own_cores_unless_the_caller_chose(monkeypatch):
    from fedllm.serve import worker_launcher

    monkeypatch.setattr(worker_launcher, "numa_nodes", lambda: 1)
    monkeypatch.setattr(worker_launcher, "divide_cores", lambda n: divide_cores(n, (0, 1, 2, 3)))
    assert vllm_env(WorkerSettings(tensor_parallel_size=2), "cpu", base={})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert vllm_env(WorkerSettings(tensor_parallel_size=2, pipeline_parallel_size=2), "cpu", base={})["VLLM_CPU_OMP_THREADS_BIND"] == "0|1|2|3"
    assert vllm_env(WorkerSettings(tensor_parallel_size=2), "cpu", base={"VLLM_CPU_OMP_THREADS_BIND": "0|3"})["VLLM_CPU_OMP_THREADS_BIND"] == "0|3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(WorkerSettings(), "cpu", base={})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(WorkerSettings(tensor_parallel_size=2), "cuda", base={})
    monkeypatch.setattr(worker_launcher, "numa_nodes", lambda: 2)  # enough nodes: vLLM's own per-node binding
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(WorkerSettings(tensor_parallel_size=2), "cpu", base={})


def test_wait_ready_then_stop_kills_the_process(tmp_path):
    worker = _fake_worker(tmp_path).start()
    try:
        worker.wait_ready(timeout_s=20, poll_s=0.1)
        assert worker.served_models() == ["m"]
        assert worker.log_path == tmp_path / "logs" / f"worker-{worker.port}.log"
    finally:
        worker.stop()
    assert worker.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)


def test_a_worker_that_dies_raises_with_the_end_of_its_log(tmp_path):
    worker = _fake_worker(tmp_path, "--exit-after-s", "0", "--exit-code", "7").start()

    with pytest.raises(WorkerStartError) as info:
        worker.wait_ready(timeout_s=20, poll_s=0.1)

    message = str(info.value)
    assert "code 7" in message and "fake service starting" in message and str(worker.log_path) in message


def test_a_worker_that_is_never_ready_times_out_and_is_stopped(tmp_path):
    worker = _fake_worker(tmp_path, "--start-delay-s", "60").start()

    with pytest.raises(WorkerStartError, match="not ready after 1 s"):
        worker.wait_ready(timeout_s=1, poll_s=0.1)

    assert not worker.alive()


def _post(url: str, body: dict, api_key: str | None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw.startswith(b"{") else raw.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _chat(url: str, model: str, api_key: str | None) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    status, answer = _post(f"{url}/v1/chat/completions", body, api_key)
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


@pytest.mark.vllm
def test_two_real_vllm_workers_answer_and_accept_runtime_lora(vllm_workers, embedded_lora_dir):
    assert len({w.port for w in vllm_workers}) == 2
    for w in vllm_workers:
        assert w.model == "smollm2-135m-instruct"
        assert _chat(w.url, w.model, w.api_key).strip()

    # Runtime LoRA loading is enabled: the adapter appears and answers under its own name.
    w = vllm_workers[0]
    load = {"lora_name": "wl-test", "lora_path": str(embedded_lora_dir)}
    assert _post(f"{w.url}/v1/load_lora_adapter", load, w.api_key)[0] == 200
    assert "wl-test" in w.served_models()
    assert isinstance(_chat(w.url, "wl-test", w.api_key), str)


@pytest.mark.vllm
def test_a_real_vllm_worker_answers_401_without_its_api_key(vllm_workers, embedded_lora_dir):
    # Reached directly, a worker started with its own key serves nothing and loads nothing without it.
    w = vllm_workers[1]
    chat = {"model": w.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _post(f"{w.url}/v1/chat/completions", chat, None)[0] == 401
    assert _post(f"{w.url}/v1/chat/completions", chat, "not-the-key")[0] == 401
    assert _post(f"{w.url}/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(embedded_lora_dir)}, None)[0] == 401
    assert _post(f"{w.url}/v1/chat/completions", chat, w.api_key)[0] == 200
    assert w.api_key not in " ".join(w.argv)  # the key travels in the environment (VLLM_API_KEY), not on argv


def test_a_worker_in_the_callers_group_is_stopped_alone(tmp_path):
    worker = _fake_worker(tmp_path)
    worker.own_process_group = False
    worker.start()
    try:
        assert os.getpgid(worker.pid) == os.getpgid(0)
        worker.wait_ready(timeout_s=20, poll_s=0.1)
    finally:
        worker.stop()  # must not signal our own group (that would end this test run)
    assert worker.proc.returncode is not None
