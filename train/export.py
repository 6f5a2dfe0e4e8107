"""Export an adapter: the PEFT folder as is, or merged into its base model as a full safetensors model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fedllm.core.errors import DataError
from fedllm.train import lora

log = logging.getLogger(__name__)


def export_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Copy the PEFT files of `adapter_dir` (config, weights, meta.json if any) to `out_dir`, with a Hugging Face model
    card (README.md) when there is a meta.json."""
    lora.read_adapter_config(adapter_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "meta.json"):
        if (Path(adapter_dir) / name).exists():
            shutil.copy2(Path(adapter_dir) / name, out_dir / name)
    if (out_dir / "meta.json").exists():  # a registry version: its model card (README.md) carries the lineage
        from fedllm.core.atomic import write_text_atomic
        from fedllm.core.contracts.lineage import model_card

        write_text_atomic(out_dir / "README.md", model_card(json.loads((out_dir / "meta.json").read_text())))
    return out_dir


def export_merged(adapter_dir: Path, base_model_dir: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Merge the adapter into the base weights and save a full model (safetensors + tokenizer) to `out_dir`.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and serves in vLLM like any model.

    Raises:
        DataError: the adapter or the base model cannot be loaded.
    """
    import torch
    from peft import PeftModel

    lora.read_adapter_config(adapter_dir)
    base = lora.load_base_model(base_model_dir, torch.float32)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"could not load adapter {adapter_dir} onto {base_model_dir}: {exc}") from exc
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    lora.load_tokenizer(base_model_dir).save_pretrained(str(out_dir))
    log.info("merged %s into %s -> %s", adapter_dir, base_model_dir, out_dir)
    return out_dir
