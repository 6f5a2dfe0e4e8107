"""An adapter version's lineage, from its registry meta.json: for `appliance adapters show` and the model card that
`appliance export` / `appliance adapters export` write next to the PEFT files.

The lineage names the base model and its hash, where the version came from (a training run, or a federation run and
round with the silos that contributed and their capped weights), the strategy, differential privacy (epsilon, delta)
and secure aggregation, the local steps and rates, and the metrics. Fields a version's meta does not record are
left out, never guessed.

The model card is a Hugging Face `README.md`: a YAML header with `base_model`, `library_name: peft` and tags (what
peft and the Hub read), then the lineage in Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# Local store names of models whose Hub id is known (the card's `base_model` then names the Hub model).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_hash(model_dir: Path) -> str | None:
    """The sha256 the model store recorded for a prepared model (store.json), else the sha256 of its safetensors
    files in name order; None when the folder is not there."""
    from fedllm.core.model_store import STORE_META, sha256_of

    model_dir = Path(model_dir)
    store = model_dir / STORE_META
    if store.is_file():
        sha = json.loads(store.read_text()).get("sha256")
        if sha:
            return str(sha)
    weights = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not weights:
        return None
    if len(weights) == 1:
        return sha256_of(weights[0])
    import hashlib

    return hashlib.sha256("".join(sha256_of(w) for w in weights).encode()).hexdigest()


def lineage(meta: dict[str, Any]) -> dict[str, Any]:
    """The lineage of the version whose meta.json is `meta` (what `adapters show --json` prints)."""
    out: dict[str, Any] = {
        "adapter": f"{meta.get('name')}:{meta.get('version')}",
        "served_name": f"{meta.get('name')}-v{meta.get('version')}",
        "created_at": meta.get("created_at"),
        "base_model": Path(str(meta["base_model"])).name if meta.get("base_model") else None,
        "base_model_hash": meta.get("base_model_hash"),
    }
    if meta.get("kind") == "federated":
        shares = meta.get("shares") or {}
        dp = meta.get("dp") or {}
        out["source"] = {"kind": "federated", "run": meta.get("run"), "round": meta.get("round")}
        out["silos"] = [{"silo": s, "weight": shares.get(s)} for s in meta.get("participants") or []]
        out["strategy"] = meta.get("strategy")
        out["lora_aggregation"] = meta.get("lora_aggregation")
        out["dp"] = {
            "mode": dp.get("mode", "off" if meta.get("epsilon") is None else "?"),
            "epsilon": meta.get("epsilon"),
            "delta": dp.get("delta"),
            "noise_multiplier": dp.get("noise_multiplier"),
            "clip_norm": dp.get("clip_norm"),
        }
        out["secure_aggregation"] = meta.get("secure_aggregation")
        out["local_steps"] = meta.get("local_steps")
        out["lr"] = meta.get("lr")
        out["lr_schedule"] = meta.get("lr_schedule")
    else:
        config = meta.get("config") or {}
        out["source"] = {"kind": "trained", "run_id": meta.get("run_id"), "data_sha256": meta.get("data_sha256")}
        out["steps"] = (meta.get("metrics") or {}).get("steps")
        out["lr"] = config.get("lr")
        out["lora_r"] = config.get("lora_r")
    out["metrics"] = meta.get("metrics") or {}
    return {k: v for k, v in out.items() if v is not None}


def model_card(meta: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for the version whose meta.json is `meta`."""
    info = lineage(meta)
    base = info.get("base_model")
    federated = info["source"]["kind"] == "federated"
    header: dict[str, Any] = {
        "library_name": "peft",
        "tags": ["lora", "peft", "fedllm-appliance"] + (["federated-learning"] if federated else []),
    }
    if base:
        header["base_model"] = HUB_IDS.get(base, base)
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=True).strip(),
        "---",
        "",
        f"# {info['served_name']}",
        "",
        f"LoRA adapter `{info['adapter']}` exported by the FedLLM Appliance.",
        "",
        "## Lineage",
        "",
    ]
    rows = [("Base model", base), ("Base model sha256", info.get("base_model_hash"))]
    if federated:
        src = info["source"]
        dp = info.get("dp") or {}
        rows += [
            ("Federation run", src.get("run")),
            ("Round", src.get("round")),
            ("Strategy", info.get("strategy")),
            ("LoRA aggregation", info.get("lora_aggregation")),
            (
                "Silos (capped weight)",
                ", ".join(
                    f"{s['silo']} ({s['weight']})" if s.get("weight") is not None else s["silo"]
                    for s in info.get("silos", [])
                )
                or None,
            ),
            ("Differential privacy", dp.get("mode")),
            ("DP epsilon", dp.get("epsilon")),
            ("DP delta", dp.get("delta")),
            ("Secure aggregation", info.get("secure_aggregation")),
            ("Local steps per round", info.get("local_steps")),
            ("Learning rate", info.get("lr")),
        ]
    else:
        src = info["source"]
        rows += [
            ("Training run", src.get("run_id")),
            ("Training data sha256", src.get("data_sha256")),
            ("Steps", info.get("steps")),
            ("Learning rate", info.get("lr")),
            ("LoRA rank", info.get("lora_r")),
        ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    if info.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in sorted(info["metrics"].items())
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
        f"{header.get('base_model', 'BASE')!r}), 'THIS_FOLDER')",
        "```",
        "",
    ]
    return "\n".join(lines)


def format_lineage(info: dict[str, Any]) -> list[str]:
    """`adapters show` as text: one `key: value` line each, nested values flattened."""
    out = []
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        elif isinstance(value, list):
            value = ", ".join(f"{r['silo']} ({r['weight']})" if isinstance(r, dict) else str(r) for r in value)
        out.append(f"{key}: {value}")
    return out
