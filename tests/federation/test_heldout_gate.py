"""The held-out figure the promotion gate uses without gate data (federation/publishing/heldout.py): each silo evaluates the
global adapter it receives before training, and the round record and the next version's meta carry the weighted loss."""

from __future__ import annotations

from fedllm.federation.publishing.heldout import received_eval
from tests.federation.conftest import FakeTrainer, federation, write_exporter


class EvalTrainer(FakeTrainer):
    def __init__(self, index: int, loss: float, **kw):
        super().__init__(index, **kw)
        self.loss = loss

    def evaluate(self):
        return {"eval_loss": self.loss}


async def test_each_round_carries_the_silos_held_out_loss_of_the_adapter_they_received(tmp_path):
    published = []
    trainers = [EvalTrainer(0, 1.0, examples=10), EvalTrainer(1, 2.0, examples=30)]
    async with federation(tmp_path, trainers, rounds=2, min_silos=2, exporter=write_exporter, on_publish=[published.append],
                          bind_address=f"ipc://{tmp_path}/fed.sock", max_silo_share=0.6) as (coord, _):
        await coord.wait_done(30)
    first, second = coord.history[0]["received_eval"], coord.history[1]["received_eval"]
    shares = coord.history[0]["shares"]
    assert first["adapter"] is None and second["adapter"] == "testrun:1"  # round 1's silos received the initial adapter
    assert abs(first["loss"] - (1.0 * shares["s0"] + 2.0 * shares["s1"])) < 1e-9  # weighted as in the round
    assert first["silos"] == ["s0", "s1"]
    assert published[1].meta["received_eval"] == second


def test_no_silo_with_eval_data_gives_no_figure():
    assert received_eval({"a": {"train_loss": 1.0}}, {"a": 1.0}, {"a": 5}, None) is None


def test_the_round_records_show_the_gate_decision_with_both_losses(tmp_path):
    import json

    from fedllm.federation.publishing.heldout import with_gate
    from fedllm.federation.runtime.report import format_status

    (tmp_path / "gate.jsonl").write_text(json.dumps({"adapter": "fed-v2", "decision": "held back", "loss": 28.9,
                                                     "current": "fed-v1", "current_loss": 1.9}) + "\n")
    rounds = [{"round": 2, "participants": ["a"], "metrics": {}, "bytes_in": 1, "bytes_out": 2, "duration_s": 1.0,
               "adapter": "fed:2"}, {"round": 3, "failed": "x"}]
    shown = with_gate(rounds, tmp_path)
    assert shown[0]["gate"]["decision"] == "held back" and "gate" not in shown[1]
    text = format_status({"run": "fed", "round": 2, "rounds_total": 3, "phase": "finished", "strategy": "fedavg",
                          "silos": [], "rounds": shown})
    assert "fed:2  held back (loss 28.9000 vs 1.9000)" in text
