"""Answer scoring: exact match and token F1 (SQuAD-style normalisation), and loss-only evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import arithmetic_records, small_cfg
from fedllm.train.evaluate import evaluate_adapter, exact_match, token_f1


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The answer is 4.", "answer is 4") == 1.0
    assert exact_match("4", "5") == 0.0


def test_token_f1_hand_computed() -> None:
    # pred {a b c}, ref {b c d e}: common 2, precision 2/3, recall 2/4 -> F1 = 2*(2/3)*(1/2)/(2/3+1/2) = 4/7
    assert token_f1("x b c", "b c d e") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


@pytest.mark.slow
def test_evaluate_base_model_and_adapter_state(tiny_model_dir: Path) -> None:
    from fedllm.train import initial_adapter_state

    cfg = small_cfg()
    base = evaluate_adapter(cfg, tiny_model_dir, None, arithmetic_records(4))
    fresh = evaluate_adapter(cfg, tiny_model_dir, initial_adapter_state(cfg, tiny_model_dir), arithmetic_records(4))
    assert base["tokens"] == fresh["tokens"] > 0
    assert fresh["eval_loss"] == pytest.approx(base["eval_loss"], abs=1e-5)  # lora_B = 0: a fresh adapter changes nothing
