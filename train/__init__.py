"""The training engine: LoRA fine-tuning with transformers + peft + DeepSpeed ZeRO (see docs/CONTRACTS.md).

The public API is what the federation calls in every silo::

    state = initial_adapter_state(cfg, model_dir)
    result = fit_adapter(cfg, model_dir, "data.jsonl", init_state=state, max_steps=20, prox_mu=0.01)
    metrics = evaluate_adapter(cfg, model_dir, result.state, "eval.jsonl")

A process that trains round after round on one model keeps a `Trainer` (the loaded base and the optimizer state stay
between calls) and gives it a `TrainPlan` per call::

    trainer = Trainer(cfg, model_dir, keep_base=True)
    result = trainer.fit(TrainPlan("data.jsonl", init_state=state, max_steps=20, keep_optimizer=True))
    save_adapter_dir(result.state, cfg, model_dir, out_dir)

Heavy libraries (torch, transformers, peft, deepspeed) load when a function is first called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.types import StateDict
from fedllm.train.engine import FitResult, TrainingFailed
from fedllm.train.evaluate import evaluate_adapter, evaluate_adapters
from fedllm.train.trainer import BaseModels, Trainer, TrainPlan, fit_adapter

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings

__all__ = [
    "BaseModels",
    "FitResult",
    "StateDict",
    "TrainPlan",
    "Trainer",
    "TrainingFailed",
    "adapter_state",
    "count_parameters",
    "evaluate_adapter",
    "evaluate_adapters",
    "fit_adapter",
    "initial_adapter_state",
    "load_adapter_state",
    "save_adapter_dir",
]


def initial_adapter_state(cfg: "TrainSettings", model_dir: Path) -> StateDict:
    """A fresh LoRA initialisation for the model (B = 0, A random), deterministic given cfg.seed."""
    import torch

    from fedllm.train import lora

    return lora.adapter_state(lora.build_peft_model(cfg, Path(model_dir), torch.float32))


def save_adapter_dir(state: StateDict, cfg: "TrainSettings", model_dir: Path, out_dir: Path) -> Path:
    """Write `state` as a PEFT folder (adapter_config.json + adapter_model.safetensors) that peft and vLLM load."""
    from fedllm.train import lora

    targets = lora.resolve_targets(cfg, lora.meta_model(Path(model_dir)))
    return lora.save_state_dir(state, lora.lora_config(cfg, targets, str(model_dir)), Path(out_dir))


def load_adapter_state(adapter_dir: Path) -> StateDict:
    """The adapter weights of a PEFT folder (keys as get_peft_model_state_dict gives them)."""
    from fedllm.train import lora

    return lora.load_state_dir(Path(adapter_dir))


def adapter_state(model: Any) -> StateDict:
    """The adapter weights of a peft model, as CPU float32."""
    from fedllm.train import lora

    return lora.adapter_state(model)


def count_parameters(cfg: "TrainSettings", model_dir: Path) -> Any:
    """LoRA parameter accounting without loading weights (see `fedllm.train.lora.ParamReport`)."""
    from fedllm.train import lora

    return lora.count_parameters(cfg, Path(model_dir))
