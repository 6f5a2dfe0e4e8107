"""Evaluation of an adapter: loss and perplexity on held-out data, exact-match and token-F1 of generated answers.

Runs on plain transformers + peft (no DeepSpeed): evaluation needs no optimizer and no sharding here.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.types import StateDict
from fedllm.train import data as datamod
from fedllm.train import lora

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, articles and extra whitespace (the SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised whitespace tokens (bag of words), 0.0..1.0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _model(cfg: "TrainSettings", model_dir: Path, state: StateDict | None) -> Any:
    """The base model with `state` as its adapter (or the bare base model when state is None), in eval mode."""
    import torch

    if state is None:
        model = lora.load_base_model(model_dir, torch.float32)
    else:
        model = lora.build_peft_model(cfg, model_dir, torch.float32, state)
    return model.eval()


def loss_metrics(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], max_seq_len: int, batch_size: int
) -> dict[str, float]:
    """Token-weighted mean loss over the answer tokens, its perplexity, and the token count."""
    import torch

    rows = datamod.unpacked_rows(datamod.tokenize_records(tokenizer, records, max_seq_len))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = datamod.collate(rows[i : i + batch_size], tokenizer.pad_token_id, packed=False)
            out = model(**batch, use_cache=False)
            n = int((batch["labels"][:, 1:] != datamod.IGNORE_INDEX).sum())
            total += float(out.loss) * n
            count += n
    loss = total / max(1, count)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def generation_metrics(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], max_new_tokens: int = 64, max_examples: int = 50
) -> dict[str, float]:
    """Greedy answers to the first `max_examples` prompts, scored against their reference answers (text records
    skipped)."""
    import torch

    pairs = [pa for r in records if (pa := datamod.prompt_and_answer(r)) is not None][:max_examples]
    if not pairs:
        return {}
    em = f1 = 0.0
    for messages, reference in pairs:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(
                "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant: ", return_tensors="pt"
            )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        prediction = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        em += exact_match(prediction, reference)
        f1 += token_f1(prediction, reference)
    return {"exact_match": em / len(pairs), "token_f1": f1 / len(pairs), "generated": len(pairs)}


def evaluate_adapter(
    cfg: "TrainSettings",
    model_dir: Path,
    state: StateDict | None,
    data: Path | Sequence[dict[str, Any]],
    *,
    generate: bool = False,
    max_new_tokens: int = 64,
    max_generate: int = 50,
) -> dict[str, float]:
    """Evaluate an adapter state (None = the base model) on records of any supported format.

    Returns:
        {"eval_loss", "perplexity", "tokens"} and, with `generate=True` on prompt/answer data,
        {"exact_match", "token_f1", "generated"} as well (greedy, over the first `max_generate` examples).
    """
    from fedllm.train.engine import set_threads

    set_threads(cfg.threads)
    records = datamod.load_data(data)
    tokenizer = lora.load_tokenizer(model_dir)
    model = _model(cfg, Path(model_dir), state)
    metrics = loss_metrics(model, tokenizer, records, cfg.max_seq_len, cfg.batch_size)
    if generate:
        metrics.update(generation_metrics(model, tokenizer, records, max_new_tokens, max_generate))
    return metrics


def evaluate_adapters(
    cfg: "TrainSettings",
    model_dir: Path,
    states: dict[str, StateDict | None],
    datasets: dict[str, Path | Sequence[dict[str, Any]]],
) -> dict[str, dict[str, float]]:
    """Eval loss of several adapters (None = the base model) on several data sets, loading the model once.

    All states must fit `cfg`'s LoRA shape (rank, targets). Returns `{adapter: {data set: eval_loss}}`.
    """
    import torch

    from fedllm.train.engine import set_threads

    set_threads(cfg.threads)
    tokenizer = lora.load_tokenizer(model_dir)
    records = {name: datamod.load_data(data) for name, data in datasets.items()}
    model = lora.build_peft_model(cfg, Path(model_dir), torch.float32).eval()
    out: dict[str, dict[str, float]] = {}
    for adapter, state in states.items():
        if state is not None:
            lora.set_adapter_state(model, state)
        out[adapter] = {}
        for name, rows in records.items():
            if state is None:
                with model.disable_adapter():
                    out[adapter][name] = loss_metrics(model, tokenizer, rows, cfg.max_seq_len, cfg.batch_size)[
                        "eval_loss"
                    ]
            else:
                out[adapter][name] = loss_metrics(model, tokenizer, rows, cfg.max_seq_len, cfg.batch_size)["eval_loss"]
    return out
