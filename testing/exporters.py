"""Adapter exporters for the coordinator in tests and benches: folders shaped like PEFT's, without training."""

from __future__ import annotations

from pathlib import Path


def write_exporter(state, out_dir: Path) -> None:
    """A stand-in for train.save_adapter_dir: a PEFT-shaped folder from a state dict."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
