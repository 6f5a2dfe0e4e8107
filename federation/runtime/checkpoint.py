"""Round checkpoints under `federation/RUN/`: written atomically, read back on restart.

Layout: `rounds/NNNNNN/` holds `global.safetensors`, `strategy.safetensors` and `state.json` (round, silos, the
round's own record: bounded, the history lives in the append-only `rounds.jsonl`); `latest.json` names the newest
complete one; `prune_checkpoints` keeps the newest `federation.keep_checkpoints` of them. A round folder is staged and
renamed into place, then `latest.json` is replaced, every file and folder fsynced, so a crash at any point leaves
the previous round intact; `load_latest` falls back to the newest readable round if the latest one is torn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.atomic import replace_dir_atomic, write_bytes_atomic, write_json_atomic
from fedllm.core.types import StateDict

logger = logging.getLogger(__name__)


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


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a file's fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` durably (every file and folder fsynced) and atomically, then point `latest.json` at it.

    Returns:
        The round's folder.
    """
    from safetensors.torch import save

    final = round_dir(run_dir, ckpt.round_id)
    if final.exists():  # left by a crash between the rename and latest.json: that round is being redone
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=final.parent))
    write_bytes_atomic(staging / "global.safetensors", save({k: v.contiguous() for k, v in ckpt.global_state.items()}))
    write_bytes_atomic(
        staging / "strategy.safetensors", save({k: v.contiguous() for k, v in ckpt.strategy_state.items()})
    )
    write_json_atomic(staging / "state.json", {"round": ckpt.round_id, **ckpt.state})
    _fsync_dir(staging)
    replace_dir_atomic(staging, final)
    _fsync_dir(final.parent)
    write_json_atomic(Path(run_dir) / "latest.json", {"round": ckpt.round_id, "dir": str(final.relative_to(run_dir))})
    _fsync_dir(Path(run_dir))
    return final


def _load_dir(d: Path, round_id: int) -> Checkpoint:
    from safetensors.torch import load_file

    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    if int(state.get("round", -1)) != round_id:
        raise ValueError(f"{d / 'state.json'} is for round {state.get('round')}, not {round_id}")
    return Checkpoint(
        round_id, load_file(str(d / "global.safetensors")), load_file(str(d / "strategy.safetensors")), state
    )


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete, readable checkpoint of the run, or None if the run has none.

    `latest.json` names the newest; if it or the round it names cannot be read (a torn write, a lost file), the
    previous rounds are tried newest first, and the fallback is logged.
    """
    from safetensors import SafetensorError

    run_dir = Path(run_dir)
    candidates: list[tuple[int, Path]] = []
    pointer = run_dir / "latest.json"
    if pointer.exists():
        try:
            info = json.loads(pointer.read_text(encoding="utf-8"))
            candidates.append((int(info["round"]), run_dir / info["dir"]))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("%s is unreadable (%s); looking for the newest readable round", pointer, exc)
    rounds = run_dir / "rounds"
    if rounds.is_dir():
        found = sorted((int(p.name), p) for p in rounds.iterdir() if p.is_dir() and p.name.isdigit())
        newest_named = candidates[0][0] if candidates else None
        candidates += [(r, p) for r, p in reversed(found) if newest_named is None or r < newest_named]
    for round_id, d in candidates:
        try:
            ckpt = _load_dir(d, round_id)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            logger.warning("checkpoint of round %d in %s is unreadable (%s); trying the previous one", round_id, d, exc)
            continue
        return ckpt
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` round folders (never the one `latest.json` names), and the staging folders
    a crash left behind (`rounds/.staging.*`, the coordinator's `.export.*`). Registered adapter versions stay.

    Returns:
        The rounds whose folders were deleted.
    """
    run_dir = Path(run_dir)
    rounds = run_dir / "rounds"
    keep_named = None
    try:
        keep_named = int(json.loads((run_dir / "latest.json").read_text(encoding="utf-8"))["round"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable latest.json: no round is kept beyond the newest ones
    deleted: list[int] = []
    if rounds.is_dir():
        found = sorted(int(p.name) for p in rounds.iterdir() if p.is_dir() and p.name.isdigit())
        for r in found[:-keep] if keep > 0 else found:
            if r != keep_named:
                shutil.rmtree(round_dir(run_dir, r), ignore_errors=True)
                deleted.append(r)
        for leftover in rounds.glob(".staging.*"):
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in run_dir.glob(".export.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if deleted:
        logger.info("deleted the checkpoints of rounds %s (federation.keep_checkpoints=%d)", deleted, keep)
    return deleted


def read_round_log(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `rounds.jsonl` (the run's history), skipping a line a crash cut short."""
    path = Path(run_dir) / "rounds.jsonl"
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON (a write cut short?); skipped", path, n)
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
