"""Settings of inference: the router (`serve/`) and the vLLM workers it forwards to."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from fedllm.core.sections.base import Section
from fedllm.core.sections.tls import ServesTLS


class WorkerSpec(Section):
    """A worker named in settings (as opposed to one that registers itself)."""

    url: str = Field(..., description="Base URL of the worker's OpenAI server, e.g. http://127.0.0.1:8100.")
    region: str = Field(
        "local",
        description="Region label used for region-aware routing and data residency (the operator's assignment).",
    )
    models: list[str] = Field(default_factory=list, description="Models it serves; empty = all its /v1/models lists.")
    max_loras: int | None = Field(
        None,
        ge=1,
        description="Adapters it can hold at once (its vLLM --max-loras); None = serve.max_adapters_per_worker.",
    )
    api_key: SecretStr | None = Field(
        None, description="The worker's own API key (vLLM --api-key); the router sends it."
    )


class WorkerSettings(Section):
    """How a local vLLM worker is launched (`appliance worker start`, `appliance up`)."""

    count: int = Field(1, ge=0, description="Local workers `appliance up` starts.")
    base_port: int = Field(8100, ge=1, le=65535, description="Port of the first local worker; the next ones count up.")
    device: str = Field("cpu", description="cpu | cuda.")
    max_model_len: int = Field(2048, ge=64, description="vLLM --max-model-len.")
    kv_cache_gib: float = Field(
        2.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, GiB; rounded up to a whole GiB)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM --gpu-memory-utilization on CUDA.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM --tensor-parallel-size: GPUs (CPU: NUMA-bound processes) one model is split across."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vLLM --pipeline-parallel-size: stages of layers, e.g. one per node."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description=(
            "vLLM --distributed-executor-backend: mp (one node) or ray (a model across nodes of a Ray cluster); "
            "None = vLLM's choice."
        ),
    )
    max_lora_rank: int = Field(16, ge=1, description="vLLM --max-lora-rank (largest adapter rank it can load).")
    max_loras: int = Field(4, ge=1, description="vLLM --max-loras (adapters resident at once).")
    startup_timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for a worker to become ready.")
    region: str = Field("local", description="Region label of workers started on this machine.")
    extra_args: list[str] = Field(default_factory=list, description="Extra arguments passed to vLLM's api_server.")


class ServeSettings(ServesTLS):
    """The router: where it listens, who may call it, and how it picks workers."""

    host: str = Field("127.0.0.1", description="Router bind address; beyond 127.0.0.1 API keys are required.")
    port: int = Field(8000, ge=0, le=65535, description="Router port.")
    workers: list[WorkerSpec] = Field(default_factory=list, description="Static workers, besides those that join.")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted API keys for /v1/* (plain, from settings)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin/*; generated under keys/ if unset."
    )
    join_token: SecretStr | None = Field(
        None, description="Bearer token a worker uses to join; generated under keys/ if unset."
    )
    policy: str = Field("score", description="round_robin | least_outstanding | score.")
    region: str = Field("local", description="The router's own region (default client region).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (bytes).")
    max_admin_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest /admin/* request body accepted (bytes; read after the token check)."
    )
    max_tokens_cap: int = Field(
        4096, ge=1, description="Largest max_tokens a request may ask for (times its n and its prompts)."
    )
    default_max_tokens: int = Field(
        256,
        ge=1,
        description=(
            "max_tokens injected into a metered request (a key with a tokens-per-minute limit) that names none, "
            "and charged for it."
        ),
    )
    health_interval_s: float = Field(5.0, gt=0, description="Seconds between health probes of each worker.")
    request_timeout_s: float = Field(600.0, gt=0, description="Upstream timeout for one request.")
    max_retries: int = Field(2, ge=0, description="Extra workers tried when one fails before the first byte.")
    retry_backoff_s: float = Field(0.05, ge=0, description="First backoff between retries (doubles each retry).")
    connect_timeout_s: float = Field(5.0, gt=0, description="Upstream connect timeout (seconds).")
    worker_capacity: int = Field(16, ge=1, description="Default concurrent requests a worker takes (policy scale).")
    worker_expiry_s: float = Field(60.0, gt=0, description="A joined worker unhealthy or silent this long is removed.")
    max_workers: int = Field(
        64, ge=1, description="Most workers in the fleet (static and joined); a join beyond is refused."
    )
    max_worker_capacity: int = Field(256, ge=1, description="Largest capacity a joining worker may claim.")
    allow_plain_http_workers: bool = Field(
        False,
        description=(
            "Let workers beyond loopback join over plain http:// (their key and prompts cross the network in clear)."
        ),
    )
    place_adapters_on_joined: bool = Field(
        False, description="Also load published adapters on joined workers (default: only on static/local ones)."
    )
    canary_prompts: int = Field(1, ge=0, description="Canary prompts per check of a joined worker (0 = no checks).")
    canary_rate: float = Field(
        0.05, ge=0, le=1, description="Chance that a user request routed to a joined worker triggers a check of it."
    )
    canary_pending_rate: float = Field(
        0.25, ge=0, le=1, description="The same until it has passed canary_passes checks (a new or cleared worker)."
    )
    canary_passes: int = Field(
        3, ge=1, description="Checks a joined worker passes before it counts as verified (state `passed`)."
    )
    canary_delay_s: float = Field(
        5.0, ge=0, description="Most seconds a triggered check waits (a random delay, so it hides among traffic)."
    )
    canary_interval_s: float = Field(
        300.0, gt=0, description="Mean seconds between the random timer's checks of each joined worker."
    )
    canary_max_tokens: int = Field(
        48, ge=1, description="Largest max_tokens of a canary (drawn at random; answers compared at temperature 0)."
    )
    canary_prompts_file: Path | None = Field(
        None,
        description=(
            "JSONL of the operator's private canary conversations (chat messages), mixed with the built-in pool."
        ),
    )
    allow_unverified: bool = Field(
        False, description="Route to a joined worker's models that no trusted worker serves (cannot be canary-checked)."
    )
    require_keys: bool = Field(
        False, description="Require API keys on /v1/* even on loopback, also when the key file is empty or missing."
    )
    affinity_load_factor: float = Field(1.25, ge=1.0, description="Bounded-load factor of prefix/session affinity.")
    adapter_replicas: int = Field(
        1, ge=1, description="Workers an adapter without an alias is loaded on when published."
    )
    replicate_promoted: bool = Field(
        True,
        description=(
            "Load the version behind each alias on every eligible worker, joiners included, before it takes "
            "traffic for it (off: adapter_replicas, as for other versions)."
        ),
    )
    max_adapter_replicas: int = Field(2, ge=1, description="Most workers a hot adapter is spread over.")
    max_adapters_per_worker: int = Field(
        4,
        ge=1,
        description=(
            "Adapters kept loaded per worker (at most: a worker declaring a smaller max_loras keeps that many); "
            "the LRU one is unloaded beyond."
        ),
    )
    adapter_load_timeout_s: float = Field(120.0, gt=0, description="Seconds a worker may take to load an adapter.")
    hedge: Literal["off", "on"] = Field(
        "off",
        description="Hedged requests: off | on. On: a request whose first byte is later than its worker's learned "
        "hedge_percentile is also sent to the next-best worker; the first to answer wins, the other is aborted.",
    )
    hedge_percentile: float = Field(
        95.0,
        ge=50.0,
        lt=100.0,
        description="Percentile of a worker's time to first byte after which a request is hedged.",
    )
    hedge_min_delay_s: float = Field(
        0.05, gt=0, description="Never hedge a request sooner than this (seconds; the floor of the learned delay)."
    )
    hedge_max_extra: float = Field(
        0.1, gt=0, le=1.0, description="Most hedges per request on average (0.1 = at most 10% extra requests)."
    )
    default_rpm: int | None = Field(
        None, ge=1, description="Requests per minute per API key unless the key says otherwise."
    )
    default_tpm: int | None = Field(
        None, ge=1, description="Tokens per minute per API key unless the key says otherwise."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in ("round_robin", "least_outstanding", "score"):
            raise ValueError(f"unknown policy {value!r}: choose round_robin, least_outstanding or score")
        return value
