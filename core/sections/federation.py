"""Settings of the federation (`federation/`): coordinator and silo."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from fedllm.core.sections.tls import ServesTLS

# The names `fedllm.federation.aggregation.strategies.STRATEGY_NAMES` builds, torch-free for the console's strategy
# picker (tests/appliance/test_settings.py keeps the two equal).
STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
    "flexlora",
    "ffa",
)


class FederationSettings(ServesTLS):
    """Coordinator and silo defaults; `appliance coordinator start` / `appliance silo join` flags override them."""

    bind_host: str = Field("127.0.0.1", description="Interface the coordinator's ZeroMQ ROUTER binds to.")
    port: int = Field(5555, ge=0, le=65535, description="Coordinator ZeroMQ port (0 = any free port).")
    status_port: int = Field(5556, ge=0, le=65535, description="Coordinator HTTP status port (0 = any free port).")
    status_token: SecretStr | None = Field(
        None,
        description=(
            "Bearer token of the coordinator's /status beyond loopback; generated under keys/status_token if "
            "unset (not the router's admin token)."
        ),
    )
    bind_address: str | None = Field(
        None, description="Full ZeroMQ endpoint to bind (e.g. ipc:///tmp/x); overrides bind_host/port."
    )
    plaintext: bool = Field(
        False, description="Disable CURVE encryption; only for tests, must be asked for explicitly."
    )
    run_name: str = Field(
        "federation", description="Name of the federation run; global adapters are published as NAME-latest."
    )
    rounds: int = Field(10, ge=1, description="Rounds to run.")
    strategy: str = Field(
        "fedavg", description="Aggregation strategy: one of fedllm.federation.aggregation.strategies.STRATEGY_NAMES."
    )
    strategy_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the strategy (e.g. prox_mu, server_lr)."
    )
    lora_aggregation: Literal["factors", "product", "frozen_a"] = Field(
        "factors",
        description="How LoRA's A and B combine: factors = average A and B (plain FedAvg); product = average the "
        "products B_i A_i, SVD back to the global rank (silos may train at their own rank); "
        "frozen_a = silos train B only from a shared A (exact averaging).",
    )
    lr_schedule: Literal["constant", "round", "federation"] = Field(
        "constant",
        description="Silos' learning rate: constant = train.lr after train.warmup_steps of round 1; round = "
        "train.lr_scheduler restarted inside every round; federation = one warmup + "
        "train.lr_scheduler across all rounds' local steps.",
    )
    local_optimizer: Literal["keep", "fresh"] = Field(
        "keep",
        description="Silos' AdamW moments between rounds: keep = each silo carries its own optimizer state (moments "
        "and step count, never sent) from round to round, as one long local run would; fresh = a new "
        "optimizer every round (what Flower's and most FL clients do).",
    )
    min_silos: int = Field(2, ge=1, description="Answers needed for a round to count.")
    round_deadline_s: float = Field(
        600.0,
        gt=0,
        description=(
            "Seconds a round gives silos to train; each silo's deadline adds its transfer allowance (see "
            "assumed_link_mbit, transfer_slack)."
        ),
    )
    assumed_link_mbit: float = Field(
        10.0,
        gt=0,
        description=(
            "Bandwidth (Mbit/s) assumed for a silo's link until its transfers were measured; sizes the transfer "
            "allowance of its first round."
        ),
    )
    transfer_slack: float = Field(
        3.0,
        ge=1,
        description=(
            "A silo's transfer allowance is this many times its expected transfer time (adapter bytes both ways "
            "over its measured throughput)."
        ),
    )
    start_timeout_s: float = Field(
        3600.0, gt=0, description="Seconds the coordinator waits for min_silos to connect before a round."
    )
    local_steps: int = Field(50, ge=1, description="Optimizer steps each silo trains per round.")
    max_message_bytes: int | None = Field(
        None,
        ge=1024,
        description=(
            "Largest message accepted on the socket (None = derived from the global adapter: max(1 MiB, 4 x its "
            "fp32 bytes + 1 MiB); set = that exact bound)."
        ),
    )
    train_window_bytes: int = Field(
        64 << 20,
        ge=1,
        description=(
            "TRAIN bytes on the way to silos at once (sent, not yet acknowledged): bounds the coordinator's "
            "memory at a round's start (CURVE encrypts a copy per connection); one TRAIN bigger than this goes "
            "alone. Raise it for big adapters over slow silo links (more downloads at once)."
        ),
    )
    receive_hwm: int = Field(
        64,
        ge=1,
        description="ZeroMQ receive high-water mark (messages queued per connection before the socket stops reading).",
    )
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "Updates whose L2 norm exceeds this are rejected (None = the adaptive bound: update_norm_multiple x "
            "the round's median update norm, at least update_norm_floor)."
        ),
    )
    update_norm_multiple: float = Field(
        3.0,
        ge=1,
        description=(
            "Adaptive bound: updates above this multiple of the round's median update L2 norm are clipped to it "
            "(the silo is named in the round record)."
        ),
    )
    update_norm_floor: float = Field(
        1e-3,
        gt=0,
        description=(
            "Adaptive bound: never below this L2 norm (a round of tiny updates does not clip a normal one to nothing)."
        ),
    )
    max_silo_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "Largest share of a round's aggregate one silo's update may weigh (1 = plain example weights); a "
            "silo's count is also bounded by the one declared at enrolment."
        ),
    )
    max_aggregate_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "A round whose global adapter change (L2 norm of new - previous) exceeds this fails and keeps the "
            "previous global (None = max_update_norm when set, else the round's adaptive bound for plain-mean "
            "strategies without DP)."
        ),
    )
    keep_checkpoints: int = Field(
        3,
        ge=1,
        description="Round checkpoints kept on disk (older ones are deleted; registered adapter versions stay).",
    )
    history_in_memory: int = Field(
        1000,
        ge=1,
        description=(
            "Round records the coordinator keeps in memory and in its status document (the newest; the whole "
            "history is in the run's rounds.jsonl), so a run of months stays bounded."
        ),
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="Silo heartbeat period.")
    silo_timeout_s: float = Field(
        30.0, gt=0, description="A silo silent for this long is shown offline and not selected."
    )
    end_silence_s: float = Field(
        120.0,
        gt=0,
        description=(
            "Silo: once it has had the last round's TRAIN, it stops after this long without a word from the "
            "coordinator (the run's BYE was lost); a restarted coordinator must be back within it."
        ),
    )
    compression: Literal["fp32", "bf16", "int8", "topk"] = Field("bf16", description="Encoding of updates on the wire.")
    dp_mode: Literal["off", "central", "silo"] = Field(
        "off", description="Client-level differential privacy: at the coordinator or at each silo."
    )
    dp_clip_norm: float = Field(1.0, gt=0, description="L2 clip bound C of each update under DP.")
    dp_noise_multiplier: float = Field(0.0, ge=0, description="Gaussian noise multiplier z (std = z * C).")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="Delta for the reported epsilon.")
    secure_aggregation: bool = Field(
        False,
        description=(
            "Secure aggregation (pairwise masks): the coordinator sees only masked updates and learns only their "
            "sum; mean-based strategies only."
        ),
    )
    secagg_threshold: int | None = Field(
        None,
        ge=2,
        description="Secure aggregation: silos needed to unmask (None = a majority of the round's silos, at least 2).",
    )
    secagg_clip_range: float = Field(
        1.0, gt=0, description="Secure aggregation: each update coordinate is clamped to +-this before quantisation."
    )
    auto_publish: bool = Field(
        True, description="Publish each round's global adapter to the router as soon as it is checkpointed."
    )
    gate: bool = Field(
        True,
        description=(
            "Promotion gate: a round's adapter moves NAME-latest only if its loss (on gate_data, else the silos' "
            "held-out loss) is not worse and its gate prompts answer (federation/publishing/gate.py); off: every "
            "round moves it."
        ),
    )
    gate_data: Path | None = Field(
        None, description="JSONL data set the promotion gate measures each round's adapter on (None = no gate)."
    )
    gate_tolerance: float = Field(
        0.02,
        ge=0,
        description="Promotion gate: how much higher (nats) a new version's loss may be than the current one's.",
    )
    gate_prompts: list[str] = Field(
        default_factory=lambda: ["Say hello in one short sentence.", "What is 2 + 3?", "Name one colour."],
        description=(
            "Promotion gate: prompts sent through the router to the new version; each answer must be non-empty "
            "and finite ([] = skip)."
        ),
    )
    gate_api_key: SecretStr | None = Field(
        None, description="Promotion gate: router API key the gate prompts send when the router requires keys."
    )
    gate_resume: bool = Field(
        True,
        description=(
            "Promotion gate on gate_data: after a held-back round, the next round trains from the promoted "
            "version (federation/publishing/gate_resume.py)."
        ),
    )
    gate_wait_s: float = Field(
        120.0,
        gt=0,
        description="Promotion gate: longest wait before a round for the previous round's decision (gate_resume).",
    )
    serve_regions: list[str] = Field(
        default_factory=list,
        description="Regions the run's adapters may be served in (router worker regions; [] = anywhere).",
    )
    # silo side
    coordinator: str | None = Field(None, description="Silo: coordinator endpoint, e.g. tcp://host:5555.")
    coordinator_key: str | None = Field(None, description="Silo: coordinator's CURVE public key (z85, 40 chars).")
    silo_id: str | None = Field(None, description="Silo: name this silo was enrolled under (default: host name).")
    silo_ranks: int = Field(
        1,
        ge=1,
        description=(
            "Silo: training ranks per node (GPUs, or CPU processes), started once and kept across rounds; "
            "train.hostfile spans nodes."
        ),
    )
    silo_require_dp: bool = Field(
        False,
        description=(
            "Silo: refuse a TRAIN that does not ask for silo-side DP (clip and noise here) with at least "
            "silo_min_noise_multiplier."
        ),
    )
    silo_min_noise_multiplier: float = Field(
        0.0, ge=0, description="Silo: the smallest DP noise multiplier this silo accepts (with silo_require_dp)."
    )
    silo_max_clip_norm: float | None = Field(
        None, gt=0, description="Silo: the largest DP clip norm this silo accepts (with silo_require_dp; None = any)."
    )
    silo_require_secagg: bool = Field(
        False,
        description=(
            "Silo: refuse a TRAIN that is not a secure-aggregation round (the coordinator would see this silo's "
            "update)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> "FederationSettings":
        if self.coordinator_key is not None and len(self.coordinator_key) != 40:
            raise ValueError(
                f"federation.coordinator_key must be a 40-character z85 CURVE key, got {len(self.coordinator_key)} "
                "characters"
            )
        return self
