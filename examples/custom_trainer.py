"""Federate your own Hugging Face `Trainer` + peft loop through the appliance's coordinator.

Your loop only has to implement the `SiloTrainer` interface (get/set the LoRA state, fit, evaluate); the
`SiloClient` does the rest: CURVE-encrypted connection, rounds, deltas, compression, reconnects.

    appliance silo keygen            # give the printed key to the coordinator's operator (federation enroll)
    python examples/custom_trainer.py --coordinator tcp://HOST:5555 --coordinator-key KEY --model DIR --data my.jsonl

The coordinator must start from the same LoRA shape: `Coordinator(..., initial_state=HFSilo(...).get_state())`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from fedllm.core.settings import load_settings
from fedllm.federation.runtime.silo import SiloClient, SiloTrainer


class HFSilo(SiloTrainer):
    """A `SiloTrainer` around transformers' `Trainer` and a peft LoRA model."""

    def __init__(self, model_dir: str, texts: list[str], lr: float = 1e-3, batch_size: int = 2, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.dataset = [self.tokenizer(t, truncation=True, max_length=128) for t in texts]
        self.lr, self.batch_size = lr, batch_size

    def get_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.model, state)

    _lock = threading.Lock()  # accelerate keeps process-wide state: one Trainer at a time per process

    def fit(self, steps: int, config: dict) -> tuple[int, dict[str, float]]:
        with self._lock, tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=self.batch_size,
                                     learning_rate=self.lr, report_to=[], save_strategy="no", logging_steps=1,
                                     use_cpu=True, disable_tqdm=True)
            collator = DataCollatorForLanguageModeling(self.tokenizer, mlm=False)
            result = Trainer(model=self.model, args=args, train_dataset=self.dataset, data_collator=collator).train()
        return len(self.dataset), {"train_loss": float(result.training_loss)}

    def evaluate(self) -> dict[str, float]:
        return {}


def read_texts(path: str, tokenizer) -> list[str]:
    """Chat JSONL rows rendered with the model's chat template."""
    with open(path, encoding="utf-8") as f:
        return [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f if line.strip()]


async def join(settings, trainer: HFSilo) -> list[int]:
    """Train every round until the coordinator ends the run; returns the rounds trained."""
    silo = SiloClient(settings, trainer)
    await silo.start()
    try:
        await silo.wait_finished()
    finally:
        await silo.stop()
    return silo.rounds_done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--coordinator-key")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--name")
    a = p.parse_args()
    settings = load_settings(overrides={"federation": {"coordinator": a.coordinator, "coordinator_key": a.coordinator_key, "silo_id": a.name}})
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    print("rounds trained:", asyncio.run(join(settings, HFSilo(a.model, read_texts(a.data, tokenizer)))))


if __name__ == "__main__":
    main()
