"""Data loading, validation, loss masks and packing (tokenizer only; the packed-attention test runs the tiny model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedllm.core.errors import DataError
from tests.train.conftest import arithmetic_records, write_jsonl
from fedllm.train import data as d


def test_loss_mask_covers_only_the_answer_and_its_end_of_turn(tokenizer) -> None:
    # Arrange: SmolLM2's template renders "...<|im_start|>assistant\nYo there<|im_end|>\n"
    record = {"prompt": "Hi", "completion": "Yo there"}
    # Act
    ex = d.tokenize_example(tokenizer, record, 512)
    learned = [tokenizer.decode([t]) for t, lab in zip(ex.input_ids, ex.labels) if lab != d.IGNORE_INDEX]
    # Assert: exactly the answer tokens plus the end-of-turn marker and its newline
    assert learned == ["Y", "o", " there", "<|im_end|>", "\n"]
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system")
    assert all(lab in (d.IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels))


def test_multi_turn_masks_every_assistant_turn_and_nothing_else(tokenizer) -> None:
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ex = d.tokenize_example(tokenizer, record, 512)
    learned = [tokenizer.decode([t]) for t, lab in zip(ex.input_ids, ex.labels) if lab != d.IGNORE_INDEX]
    assert learned == ["b", "<|im_end|>", "\n", "d", "<|im_end|>", "\n"]


def test_alpaca_and_text_formats(tokenizer) -> None:
    alpaca = d.tokenize_example(tokenizer, {"instruction": "Add", "input": "1 1", "output": "2"}, 512)
    assert "Add\n\n1 1" in tokenizer.decode(alpaca.input_ids)
    assert tokenizer.decode([t for t, lab in zip(alpaca.input_ids, alpaca.labels) if lab != -100]) == "2<|im_end|>\n"
    text = d.tokenize_example(tokenizer, {"text": "plain words"}, 512)
    assert text.labels == text.input_ids and text.input_ids[-1] == tokenizer.eos_token_id


BAD_CASES = [
    ("{not json", "bad JSON"),
    (json.dumps({"foo": 1}), "no known fields"),
    (json.dumps({"prompt": "q", "completion": "  "}), "empty answer"),
    (json.dumps({"instruction": "q", "output": ""}), "empty answer"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "wrong role order"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}), "wrong role order"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "wrong role order"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role"),
    (json.dumps([1, 2]), "expected a JSON object"),
]


@pytest.mark.parametrize("line,problem", BAD_CASES)
def test_each_bad_line_is_reported_with_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    good = json.dumps({"prompt": "q", "completion": "a"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError) as err:
        d.load_jsonl(path)
    assert f"{path}:3: " in str(err.value) and problem in str(err.value)


def test_all_errors_are_collected_at_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", json.dumps({"prompt": "q", "completion": "a"}), json.dumps({"text": ""})])
    with pytest.raises(DataError) as err:
        d.load_jsonl(path)
    assert "2 invalid record(s)" in str(err.value) and f"{path}:1:" in str(err.value) and f"{path}:3:" in str(err.value)


def test_in_memory_rows_are_validated_too() -> None:
    with pytest.raises(DataError, match="<rows>:2: empty answer"):
        d.load_data([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}])


def test_packing_keeps_every_token_exactly_once(tokenizer) -> None:
    examples = d.tokenize_records(tokenizer, arithmetic_records(30), 128)
    rows = d.pack_examples(examples, 128)
    assert len(rows) < len(examples)
    assert all(len(r.input_ids) <= 128 for r in rows)
    packed = [t for r in rows for t in r.input_ids]
    assert packed == [t for ex in examples for t in ex.input_ids]  # same tokens, same order, once each
    # position ids restart at 0 at every example start, and the first label of each example is masked
    starts = [i for r in rows for i, p in enumerate(r.position_ids) if p == 0]
    assert len(starts) == len(examples)
    assert Counter(lab for r in rows for lab in r.labels)[d.IGNORE_INDEX] >= len(examples)


def test_split_and_shuffle_are_deterministic() -> None:
    recs = arithmetic_records(20)
    a = d.split_eval(recs, 0.25, seed=3)
    assert a == d.split_eval(recs, 0.25, seed=3)
    assert len(a[1]) == 5 and not ({json.dumps(r) for r in a[0]} & {json.dumps(r) for r in a[1]})
    assert d.epoch_order(10, 1, 0) == d.epoch_order(10, 1, 0) != d.epoch_order(10, 1, 1)


def test_packed_rows_do_not_attend_across_examples(tiny_model_dir: Path, tokenizer) -> None:
    """The loss of a packed row equals the losses of its examples computed alone (no cross-example attention)."""
    import torch

    from fedllm.train.lora import load_base_model

    model = load_base_model(tiny_model_dir, torch.float32).eval()
    examples = d.tokenize_records(tokenizer, arithmetic_records(3), 64)
    packed = d.collate(d.pack_examples(examples, 256), tokenizer.pad_token_id, packed=True)
    alone = d.collate(d.unpacked_rows(examples), tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        lp = model(**packed, use_cache=False).logits  # (1, total, vocab)
        la = model(**alone, use_cache=False).logits  # (3, longest, vocab)
    offset = 0
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        torch.testing.assert_close(lp[0, offset : offset + n], la[i, :n], atol=1e-4, rtol=1e-4)
        offset += n
