"""Silos training at ranks 4, 8 and 16 in one federation with product aggregation: each is sent the global
adapter projected to its own rank, the round completes, and what each silo receives is a PEFT adapter of its
rank (loaded by peft here, by a real vLLM worker in the `vllm` test)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch

from fedllm.federation.runtime.coordinator import Coordinator
from fedllm.federation.demo.data import generate
from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
from fedllm.federation.aggregation.strategies import make_strategy
from tests.federation.conftest import fed_settings, silo_settings

RANKS = {"northbridge": 4, "lakeside": 8, "redwood": 16}


class RecordingTrainer(EngineTrainer):
    """The engine trainer, keeping every adapter state the coordinator sent it."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.received: list[dict[str, torch.Tensor]] = []

    def set_state(self, state) -> None:
        self.received.append({k: v.clone() for k, v in state.items()})
        super().set_state(state)


def _federate(model_dir: Path, tmp_path: Path, rounds: int = 2):
    from fedllm import train

    settings = fed_settings(tmp_path / "c", plaintext=True, rounds=rounds, min_silos=3, local_steps=1, round_deadline_s=600,
                            silo_timeout_s=120, lr_schedule="constant")
    base = settings.train.model_copy(update={"max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0,
                                             "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lr": 1e-3})
    data = generate()
    cfgs = {org: base.model_copy(update={"lora_r": r}) for org, r in RANKS.items()}
    trainers = {org: RecordingTrainer(cfgs[org], model_dir, data[org]["train"][:6]) for org in RANKS}
    strategy = make_strategy("flexlora", lora_alpha=base.lora_alpha)

    async def main():
        coord = Coordinator(settings, strategy, initial_state=train.initial_adapter_state(base, model_dir), exporter=False)
        address = await coord.start()
        silos = [SiloClient(silo_settings(tmp_path / org, address, org, plaintext=True, silo_timeout_s=120), t)
                 for org, t in trainers.items()]
        try:
            for s in silos:
                await s.start()
            await coord.wait_done(900)
        finally:
            for s in silos:
                await s.stop()
            await coord.stop()
        return coord

    coord = asyncio.run(main())
    return coord, trainers, cfgs, base


def _rank(state) -> int:
    from fedllm.federation.aggregation.lora_aggregate import lora_rank

    return lora_rank(state)


@pytest.mark.slow
def test_a_round_of_ranks_4_8_16_gives_each_silo_its_own_rank(tiny_model_dir: Path, tmp_path: Path):
    # Act
    coord, trainers, cfgs, base = _federate(tiny_model_dir, tmp_path)
    # Assert: both rounds counted every silo; the global adapter keeps rank 8 and moved
    assert coord.phase == "done" and [r["participants"] for r in coord.history] == [sorted(RANKS)] * 2
    assert coord.strategy.name == "flexlora" and _rank(coord.global_state) == 8
    for org, trainer in trainers.items():
        assert [_rank(s) for s in trainer.received] == [RANKS[org]] * 2
    # each received adapter is a PEFT folder of its rank that peft loads onto the base model
    from fedllm import train
    from fedllm.train import lora

    for org, trainer in trainers.items():
        out = train.save_adapter_dir(trainer.received[-1], cfgs[org], tiny_model_dir, tmp_path / f"adapter-{org}")
        assert lora.read_adapter_config(out)["r"] == RANKS[org]
        model = lora.build_peft_model(cfgs[org], tiny_model_dir, torch.float32, train.load_adapter_state(out))
        assert _rank(lora.adapter_state(model)) == RANKS[org]


@pytest.mark.vllm
def test_heterogeneous_rank_adapters_load_into_vllm(embedded_model_dir: Path, vllm_worker, tmp_path: Path):
    import httpx

    from fedllm import train

    # Arrange: a two-round federation of ranks 4, 8, 16 on the embedded model
    coord, trainers, cfgs, _ = _federate(embedded_model_dir, tmp_path)
    assert coord.phase == "done"
    with httpx.Client(base_url=vllm_worker.url, timeout=120, headers={"Authorization": f"Bearer {vllm_worker.api_key}"}) as client:
        for org, trainer in trainers.items():
            out = train.save_adapter_dir(trainer.received[-1], cfgs[org], embedded_model_dir, tmp_path / f"adapter-{org}")
            name = f"hetero-{org}-{uuid.uuid4().hex[:6]}"
            # Act
            loaded = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(out)})
            # Assert
            assert loaded.status_code == 200, loaded.text
            reply = client.post("/v1/chat/completions", json={"model": name, "max_tokens": 8, "temperature": 0,
                                                               "messages": [{"role": "user", "content": "Hello"}]})
            assert reply.status_code == 200 and reply.json()["model"] == name, reply.text
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})
