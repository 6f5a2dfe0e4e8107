"""A silo that is itself a cluster: `RankGroupTrainer` trains each round on N ranks kept alive across rounds.

The silo agent (this process) speaks the federation protocol; it drives rank 0 of a `fedllm.train.rank_group.RankGroup`,
which broadcasts each round's global adapter to the other ranks and sends back the trained one. The group starts
once (processes, imports, torch.distributed, DeepSpeed's shared-memory ops, the base model: loaded by each rank's
first round and kept for the next, except under ZeRO-3, which partitions it) and serves every round; a rank that dies
fails that round's `fit` (the silo answers ERROR train_failed at once) and the next round starts a fresh group.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fedllm.federation.runtime.silo import EngineTrainer

if TYPE_CHECKING:
    from fedllm.core.sections import TrainSettings

__all__ = ["RankGroupTrainer"]


class RankGroupTrainer(EngineTrainer):
    """`SiloTrainer` on `ranks` training ranks (per node of `hostfile`); otherwise as `EngineTrainer`.

    In-memory rows are written once to a private (0600) JSONL file the ranks read; they never leave the machine.
    Call `close()` when the silo leaves (stops the ranks).
    """

    def __init__(
        self,
        cfg: "TrainSettings",
        model_dir: Path,
        data: Path | Sequence[dict],
        eval_data: Path | Sequence[dict] | None = None,
        run_dir: Path | None = None,
        *,
        ranks: int = 2,
        hostfile: Path | None = None,
    ) -> None:
        from fedllm.train.rank_group import RankGroup

        super().__init__(cfg, model_dir, data, eval_data, run_dir)
        self._files = tempfile.TemporaryDirectory(prefix="silo-data-")
        self.data_path = _as_file(data, Path(self._files.name) / "train.jsonl")
        self.eval_path = _as_file(eval_data, Path(self._files.name) / "eval.jsonl") if eval_data is not None else None
        self.group = RankGroup(ranks, hostfile=hostfile)

    def fit(self, steps: int, config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        updates, kwargs = self.round_overrides(config)
        cfg = self.cfg.model_copy(update=updates) if updates else self.cfg
        result = self.group.fit(
            cfg,
            self.model_dir,
            self.data_path,
            init_state=self.get_state(),
            max_steps=steps,
            eval_data=self.eval_path,
            run_dir=self.run_dir,
            **kwargs,
        )
        self._state = result.state
        return result.num_examples, dict(result.metrics)

    def close(self) -> None:
        self.group.close()
        self._files.cleanup()


def _as_file(data: Path | Sequence[dict], path: Path) -> Path:
    if isinstance(data, (str, Path)):
        return Path(data).resolve()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in data)
    return path
