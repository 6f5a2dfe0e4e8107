"""The DeepSpeed engine on the tiny model: learning, ZeRO stages, exact resume, FedProx, the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.conftest import arithmetic_records, small_cfg
from fedllm.train import FitResult, TrainingFailed, fit_adapter, initial_adapter_state


def _dist(a, b) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


@pytest.mark.slow
def test_loss_falls_and_the_run_folder_follows_the_contract(tiny_model_dir: Path, records, tmp_path: Path) -> None:
    seen: list[dict] = []
    result = fit_adapter(small_cfg(checkpoint_every_steps=4), tiny_model_dir, records, max_steps=8, run_dir=tmp_path / "run",
                         progress=seen.append, eval_data=arithmetic_records(4))
    assert isinstance(result, FitResult) and result.num_examples == len(records)
    assert [m["step"] for m in seen] == list(range(1, 9))
    assert seen[-1]["loss"] < seen[0]["loss"] - 0.5
    assert result.metrics["eval_loss"] > 0 and result.metrics["perplexity"] > 1

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "total_steps", "loss", "lr", "tokens_per_s", "elapsed_s", "eta_s", "time"} <= set(lines[0])
    assert lines[-1]["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "done" and status["exit_code"] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["max_seq_len"] == 128
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000008"


@pytest.mark.slow
def test_zero_stages_0_2_3_train_to_the_same_adapter_layout(tiny_model_dir: Path, records) -> None:
    variants = {0: small_cfg(zero_stage=0), 2: small_cfg(zero_stage=2), 3: small_cfg(zero_stage=3),
                "3+offload": small_cfg(zero_stage=3, offload_optimizer=True, offload_param=True)}
    results = {stage: fit_adapter(cfg, tiny_model_dir, records, max_steps=3) for stage, cfg in variants.items()}
    layouts = {stage: {k: tuple(v.shape) for k, v in r.state.items()} for stage, r in results.items()}
    assert layouts[0] == layouts[2] == layouts[3] == layouts["3+offload"] and len(layouts[0]) == 16
    init = initial_adapter_state(small_cfg(), tiny_model_dir)
    for r in results.values():
        assert _dist(r.state, init) > 0  # every stage really updated the adapter
    # same seed, same data, fp32: the stages differ only in how state is partitioned, so they agree closely
    assert _dist(results[0].state, results[3].state) < 1e-3 * _dist(results[0].state, init) + 1e-5


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_after_interruption_equals_an_uninterrupted_run_despite_a_torn_metrics_line(tiny_model_dir: Path, records, tmp_path: Path) -> None:
    cfg = small_cfg(zero_stage=2, grad_accum=2, lora_dropout=0.1, warmup_steps=1, checkpoint_every_steps=2)
    full = fit_adapter(cfg, tiny_model_dir, records, max_steps=4, run_dir=tmp_path / "full")

    def stop_at_2(record: dict) -> None:
        if record["step"] == 2:
            raise _Interrupt()

    with pytest.raises(TrainingFailed):
        fit_adapter(cfg, tiny_model_dir, records, max_steps=4, run_dir=tmp_path / "cut", progress=stop_at_2)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a step logged after the last checkpoint is redone
        f.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
        f.write('{"step": 4, "lo')  # and the process died while writing the next line
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["state"] == "failed"
    resumed = fit_adapter(cfg, tiny_model_dir, records, max_steps=4, run_dir=tmp_path / "cut", resume=True)

    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], rel=1e-5)
    assert resumed.state.keys() == full.state.keys()
    for k in full.state:
        assert resumed.state[k].allclose(full.state[k], atol=1e-6, rtol=1e-5), k


@pytest.mark.slow
def test_proximal_term_pulls_toward_the_reference(tiny_model_dir: Path, records) -> None:
    cfg = small_cfg(lr=2e-2)
    ref = initial_adapter_state(cfg, tiny_model_dir)
    free = fit_adapter(cfg, tiny_model_dir, records, init_state=ref, max_steps=4)
    prox = fit_adapter(cfg, tiny_model_dir, records, init_state=ref, max_steps=4, prox_mu=50.0)
    assert _dist(prox.state, ref) < 0.8 * _dist(free.state, ref)


def test_bad_data_stops_before_any_run_folder_is_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.core.errors import DataError

    with pytest.raises(DataError, match="<rows>:1"):
        fit_adapter(small_cfg(), tiny_model_dir, [{"prompt": "q", "completion": ""}], max_steps=1, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
