"""Round checkpoints under `federation/RUN/`: written atomically, read back on restart.

Layout: `rounds/NNNNNN/` holds `global.safetensors`, `strategy.safetensors` and `state.json` (round, participants,
history of round records, accountant); `latest.json` names the newest complete one. A round folder is staged and
renamed into place, then `latest.json` is replaced, so a crash at any point leaves the previous round intact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.atomic import replace_dir_atomic, write_json_atomic
from appliance.core.types import StateDict


@dataclass
class Checkpoint:
    """A completed round, as stored."""

    round_id: int
    global_state: StateDict
    strategy_state: StateDict
    state: dict[str, Any] = field(default_factory=dict)


def round_dir(run_dir: Path, round_id: int) -> Path:
    """Folder of round `round_id`."""
    return Path(run_dir) / "rounds" / f"{round_id:06d}"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` atomically and point `latest.json` at it; returns its folder."""
    from safetensors.torch import save_file

    final = round_dir(run_dir, ckpt.round_id)
    if final.exists():  # left by a crash between the rename and latest.json: that round is being redone
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=final.parent))
    save_file({k: v.contiguous() for k, v in ckpt.global_state.items()}, str(staging / "global.safetensors"))
    save_file({k: v.contiguous() for k, v in ckpt.strategy_state.items()}, str(staging / "strategy.safetensors"))
    write_json_atomic(staging / "state.json", {"round": ckpt.round_id, **ckpt.state})
    replace_dir_atomic(staging, final)
    write_json_atomic(Path(run_dir) / "latest.json", {"round": ckpt.round_id, "dir": str(final.relative_to(run_dir))})
    return final


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run, or None if the run has none."""
    from safetensors.torch import load_file

    pointer = Path(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text(encoding="utf-8"))
    d = Path(run_dir) / info["dir"]
    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    return Checkpoint(int(info["round"]), load_file(str(d / "global.safetensors")),
                      load_file(str(d / "strategy.safetensors")), state)
