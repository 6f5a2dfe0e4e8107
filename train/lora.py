"""LoRA: per-architecture default targets, parameter accounting on the meta device, adapter state load/save.

Adapter states are the adapter-name-free dicts `peft.get_peft_model_state_dict` returns
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ...), which is also what
``adapter_model.safetensors`` holds, so a state moves between memory, disk, the wire and vLLM unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ConfigError, DataError
from fedllm.core.types import StateDict

if TYPE_CHECKING:
    import torch

    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"

# Attention projections by default: what vLLM's LoRA kernels serve for every one of these architectures.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def default_targets(model_type: str) -> list[str]:
    """The default LoRA target modules for a transformers `model_type` ('all-linear' when unknown)."""
    return list(DEFAULT_TARGETS.get(model_type, [ALL_LINEAR]))


def load_config(model_dir: Path) -> Any:
    """The transformers config of an HF folder, or of a config.json file."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    try:
        if model_dir.is_file():
            return AutoConfig.from_pretrained(str(model_dir))
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read a model config from {model_dir}: {exc}") from exc


def meta_model(model_dir: Path) -> Any:
    """The model built on the meta device: shapes and module names, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_targets(cfg: "TrainSettings", model: Any) -> list[str]:
    """The module-name suffixes LoRA adapts in `model`: cfg.target_modules, the default, or every linear.

    Raises:
        ConfigError: no module of the model matches the requested names.
    """
    requested = cfg.target_modules or default_targets(model.config.model_type)
    linear = _linear_names(model)
    if requested == [ALL_LINEAR]:
        return sorted({n.rsplit(".", 1)[-1] for n in linear})
    found = {t for t in requested if any(n == t or n.endswith("." + t) for n in linear)}
    missing = [t for t in requested if t not in found]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"target_modules {missing} match no linear layer of this model; it has {kinds} (or use all-linear)"
        )
    return list(requested)


def _linear_names(model: Any) -> list[str]:
    """Names of linear layers LoRA may adapt (peft's all-linear rule: every Linear/Conv1D but the output head)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not out]


def lora_config(cfg: "TrainSettings", targets: list[str], base_model: str = "") -> Any:
    """A peft LoraConfig for causal LM training from the train settings and resolved targets."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path=base_model or None,
    )


@dataclass(frozen=True)
class ParamReport:
    """What a LoRA configuration adds to a model, computed from shapes only."""

    model_type: str
    total_params: int
    trainable_params: int
    trainable_share: float
    adapter_bytes_fp32: int
    adapter_bytes_bf16: int
    target_modules: list[str]
    targeted_layers: int
    adapter_tensors: int


def count_parameters(cfg: "TrainSettings", model_dir: Path) -> ParamReport:
    """LoRA parameter accounting on the meta device (no weights loaded): r * (in + out) per targeted layer.

    `total_params` counts the base model's parameters (tied embeddings once), as peft's
    `get_nb_trainable_parameters` does, plus the LoRA parameters.
    """
    model = meta_model(model_dir)
    targets = resolve_targets(cfg, model)
    layers = [
        m
        for n, m in model.named_modules()
        if n in set(_linear_names(model)) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    lora = sum(cfg.lora_r * (_in_out(m)[0] + _in_out(m)[1]) for m in layers)
    base = sum(p.numel() for p in model.parameters())
    total = base + lora
    return ParamReport(
        model_type=model.config.model_type,
        total_params=total,
        trainable_params=lora,
        trainable_share=lora / total,
        adapter_bytes_fp32=lora * 4,
        adapter_bytes_bf16=lora * 2,
        target_modules=targets,
        targeted_layers=len(layers),
        adapter_tensors=2 * len(layers),
    )


def _in_out(module: Any) -> tuple[int, int]:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape  # transformers Conv1D stores (in, out)
    return rows, cols


def load_base_model(model_dir: Path, dtype: "torch.dtype") -> Any:
    """Load the base causal LM (sdpa attention, so packed position_ids give block-diagonal attention)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise DataError(f"could not load a causal LM from {model_dir}: {exc}") from exc


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def unload_base(peft_model: Any) -> Any:
    """The base model under a peft model, its LoRA layers removed and its weights frozen (to build on again).

    Not for ZeRO-3, whose engine partitions the base weights themselves.
    """
    base = peft_model.unload()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def build_peft_model(
    cfg: "TrainSettings", model_dir: Path, dtype: "torch.dtype", init_state: StateDict | None = None, base: Any = None
) -> Any:
    """Base model + fresh LoRA (seeded by cfg.seed), optionally starting from `init_state`.

    `base`: an already loaded base model of `model_dir` (a `Trainer` keeps one, see `unload_base`); default: loaded
    here.

    Raises:
        DataError: `init_state` does not fit this model and configuration (names the first missing/extra key).
    """
    import torch
    from peft import get_peft_model

    if base is None:
        base = load_base_model(model_dir, dtype)
    targets = resolve_targets(cfg, base)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, lora_config(cfg, targets, str(model_dir)))
    if init_state is not None:
        set_adapter_state(model, init_state)
    return model


def set_gradient_checkpointing(model: Any, on: bool) -> None:
    """Turn activation checkpointing of the base model's decoder layers on or off (`train.gradient_checkpointing`).

    Non-reentrant checkpointing: gradients reach the LoRA weights inside each layer though the frozen embeddings
    need none, and dropout is replayed with the same random state, so a step computes the same update either way.
    """
    base = model.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        return
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def freeze_lora_a(model: Any) -> int:
    """Stop training every lora_A matrix (FFA-LoRA: A stays at its initial value, only B learns); returns how many.

    With A fixed and shared, federated averaging of B is exact: mean_i(B_i) A = mean_i(B_i A).
    """
    frozen = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def adapter_state(model: Any) -> StateDict:
    """The adapter weights of a peft model as a detached CPU float32 dict (adapter-name-free keys)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", copy=True).float().contiguous() for k, v in get_peft_model_state_dict(model).items()
    }


def set_adapter_state(model: Any, state: StateDict) -> None:
    """Load `state` into a peft model's adapter, checking keys and shapes first.

    Raises:
        DataError: a key is missing, unexpected, or has the wrong shape.
    """
    from peft import set_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in adapter_state_shapes(model).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise DataError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [k for k in expected if expected[k] != got[k]]
    if bad:
        raise DataError(f"adapter state shape mismatch at {bad[0]}: {got[bad[0]]}, expected {expected[bad[0]]}")
    result = set_peft_model_state_dict(model, state)
    lora_missing = [k for k in result.missing_keys if "lora_" in k]  # type: ignore[attr-defined]  # peft types it `namedtuple`
    if lora_missing:
        raise DataError(f"adapter state was not loaded into {lora_missing[:3]}")


def adapter_state_shapes(model: Any) -> StateDict:
    """The (un-copied) adapter tensors of a peft model."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_state_dir(state: StateDict, config: Any, out_dir: Path) -> Path:
    """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) from a state and a LoraConfig."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return out_dir


def load_state_dir(adapter_dir: Path) -> StateDict:
    """Read `adapter_model.safetensors` of a PEFT folder.

    Raises:
        DataError: the folder lacks the file.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise DataError(f"{adapter_dir} is not a PEFT adapter folder: adapter_model.safetensors is missing")
    return load_file(str(path))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT folder as a dict."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise DataError(f"{adapter_dir} is not a PEFT adapter folder: adapter_config.json is missing")
    return json.loads(path.read_text())
