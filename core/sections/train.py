"""Settings of the training engine (`train/`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedllm.core.sections.base import Section


class TrainSettings(Section):
    """LoRA and optimisation defaults; every `appliance train` flag overrides one of these."""

    lora_r: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt; None picks the architecture's default; ['all-linear'] adapts every linear.",
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU memory.")
    offload_param: bool = Field(False, description="ZeRO-3 parameter offload to CPU memory.")
    precision: str = Field("auto", description="auto | fp32 | bf16 | fp16; auto = bf16 on a capable GPU, fp32 on CPU.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train (ignored when epochs is set).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data; overrides max_steps when set.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps before the decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR after warmup: cosine or linear decay to 0 at the last step, or constant."
    )
    lora_freeze_a: bool = Field(False, description="Train only LoRA's B; A stays at its seeded init (FFA-LoRA).")
    gradient_checkpointing: bool = Field(
        True,
        description=(
            "Recompute each decoder layer's activations in the backward pass instead of keeping them: much less "
            "memory per step (activations dominate LoRA training), about a third more compute."
        ),
    )
    threads: int | None = Field(None, ge=1, description="torch/OpenMP threads; None = the cores this process may use.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    batch_size: int = Field(
        4, ge=1, description="Global micro-batch (sequences); each of the ranks takes batch_size / ranks of it."
    )
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_seq_len: int = Field(512, ge=16, description="Tokens per (packed) sequence.")
    packing: bool = Field(True, description="Pack short examples into full sequences (no cross-example attention).")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of the data held out for eval when no --eval file."
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N steps (and at the end)."
    )
    seed: int = Field(0, description="Seed for shuffling, init and dropout.")
    ranks: int = Field(
        1,
        ge=1,
        description=(
            "`appliance train`: ranks per node (GPUs; CPU processes with gloo), started by DeepSpeed's launcher "
            "when > 1."
        ),
    )
    hostfile: str | None = Field(
        None, description="`appliance train`: DeepSpeed hostfile (`HOST slots=N` per line) to span several nodes."
    )
