"""One round's checked updates on disk, so the coordinator's memory does not grow with the number of silos.

The coordinator cannot add an update to the strategy's accumulator as it arrives: the round's adaptive norm bound
(a multiple of the median norm) and the capped shares need every norm and count first. Instead of keeping every
update in RAM until the round closes, `UpdateSpool` writes each checked float32 update to
`RUN/spool/round-N/NNNNNN.safetensors` (written to a temporary name and renamed: a crash leaves either the whole file
or none; safetensors, never pickle) and keeps only its L2 norm, its key order and the file's name. At close the
coordinator reads the updates back one at a time (`load_clipped`), clips each to the bound and adds it to the
accumulator: RAM is one accumulator plus about one update in flight, whatever the number of silos. The files are
deleted when the round has been aggregated; a crashed coordinator's leftovers are removed when the next round starts.

Robust strategies (median, trimmed mean, Krum) compare every update coordinate by coordinate. With a spool attached
(`attach_spool`), their `StoringAccumulator` writes its (clipped) updates to the round's folder and hands the strategy
`SpooledUpdate` mappings that read ONE tensor from disk when indexed: `coordinate_median` / `trimmed_mean` /
`krum_select` work key by key, so their RAM is `silos x the largest tensor` (for a LoRA adapter one layer's A or B,
e.g. 100 silos x 64 KiB) instead of `silos x adapter`; the price is a second write of every update and one read of
each tensor per silo (Krum: two, distances then the mean of the chosen). The results are bit-identical to the
in-memory path: the same float32 values are read back, in the same key order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.core.types import StateDict

logger = logging.getLogger(__name__)

SPOOL_DIR = "spool"  # under the run folder

__all__ = ["SPOOL_DIR", "UpdateSpool", "SpooledUpdate", "open_round_spool", "attach_spool", "remove_spool"]


class SpooledUpdate(Mapping[str, torch.Tensor]):
    """A read-only view of one spooled update: `update[key]` reads that tensor (a fresh float32 copy) from its file."""

    def __init__(self, path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.path, self._keys, self._shapes = path, keys, shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return read_safetensors(self.path, [key])[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def load(self) -> StateDict:
        """Every tensor, in the update's key order (one whole update in RAM)."""
        return read_safetensors(self.path, self._keys)


class UpdateSpool:
    """silo -> checked update, kept on disk, with each update's L2 norm computed once on arrival.

    Behaves like the `dict[str, StateDict]` it replaces (`spool[sid] = update`, `spool[sid]`, `pop`, `in`,
    iteration, `len`, `clear`), but `spool[sid]` reads the file back and only the metadata stays in RAM.

    Args:
        directory: the folder for this round's files; created empty (anything already there is removed).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._entries: dict[str, tuple[Path, list[str], dict[str, tuple[int, ...]]]] = {}
        self._norms: dict[str, float] = {}
        self._next = 0

    def __setitem__(self, silo_id: str, update: Mapping[str, torch.Tensor]) -> None:
        """Write the update (as float32) and note its global L2 norm."""
        from fedllm.federation.aggregation.aggregate import global_norm

        if silo_id in self._entries:
            self.pop(silo_id)
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in update.items()}
        path = self.directory / f"{self._next:06d}.safetensors"
        self._next += 1
        tmp = path.with_suffix(".tmp")
        write_safetensors(tmp, tensors)
        os.replace(tmp, path)
        self._entries[silo_id] = (path, list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
        self._norms[silo_id] = global_norm(tensors)

    def __getitem__(self, silo_id: str) -> StateDict:
        return self.lazy(silo_id).load()

    def lazy(self, silo_id: str) -> SpooledUpdate:
        """The update as a mapping that reads one tensor per access."""
        path, keys, shapes = self._entries[silo_id]
        return SpooledUpdate(path, keys, shapes)

    def __contains__(self, silo_id: object) -> bool:
        return silo_id in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def pop(self, silo_id: str, default: Any = None) -> None:
        """Forget a silo's update and delete its file (returns `default`: the update is not read back)."""
        entry = self._entries.pop(silo_id, None)
        self._norms.pop(silo_id, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)
        return default

    def norms(self) -> dict[str, float]:
        """silo -> the global L2 norm of its update (as `fedllm.federation.aggregation.bounds.norms_of` computes it)."""
        return dict(self._norms)

    def load_clipped(self, silo_id: str, bound: float | None) -> tuple[StateDict, dict[str, float] | None]:
        """(the update, clipped to `bound` when its norm exceeds it; `{"norm", "clipped_to"}` if it was clipped, else
        None), with the same maths as `fedllm.federation.aggregation.bounds.clip_round`."""
        from fedllm.federation.aggregation.aggregate import clip_update

        update = self[silo_id]
        if bound is None or self._norms[silo_id] <= bound:  # not clipped: as is (clip_round keeps it as is too)
            return update, None
        clipped, norm = clip_update(update, bound)
        return clipped, {"norm": float(norm), "clipped_to": float(bound)}

    def clear(self) -> None:
        """Delete every update file (the folder stays for a storing accumulator's files)."""
        for sid in list(self._entries):
            self.pop(sid)

    def close(self) -> None:
        """Delete the folder and everything in it."""
        self._entries.clear()
        self._norms.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write float32 CPU `tensors` as a safetensors file tensor by tensor (`safetensors.torch.save_file` first builds
    the whole file in memory: a second copy of the update). Not fsynced: a spool does not outlive a crash (the next
    round removes it), the rename only keeps a half-written file from ever being read."""
    header: dict[str, Any] = {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{key!r}: the spool writes float32 only, got {t.dtype}")
        size = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            fh.write(t.contiguous().numpy().data.cast("B"))


def read_safetensors(path: Path, keys: list[str] | None = None) -> StateDict:
    """The float32 tensors `keys` (default: all, in file order) of a file `write_safetensors` wrote, read into fresh
    tensors with plain reads (no memory mapping: nothing of the file stays resident)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        start = 8 + length
        out: StateDict = {}
        for key in keys if keys is not None else list(header):
            spec = header[key]
            if spec["dtype"] != "F32":
                raise ValueError(f"{path}: {key!r} is {spec['dtype']}, the spool holds F32 only")
            begin, end = spec["data_offsets"]
            tensor = torch.empty(spec["shape"], dtype=torch.float32)
            fh.seek(start + begin)
            view = tensor.numpy().data.cast("B")
            if fh.readinto(view) != end - begin:
                raise ValueError(f"{path}: {key!r} is truncated")
            out[key] = tensor
    return out


def remove_spool(run_dir: Path) -> None:
    """Delete every spooled round of a run (a crashed coordinator's leftovers)."""
    shutil.rmtree(Path(run_dir) / SPOOL_DIR, ignore_errors=True)


def open_round_spool(run_dir: Path, round_id: int, acc: Any = None) -> UpdateSpool:
    """A fresh spool for `round_id` under `run_dir/spool/` (earlier rounds' folders are removed), and the same for
    `acc`'s stored updates when it keeps them (`attach_spool`)."""
    remove_spool(run_dir)
    spool = UpdateSpool(Path(run_dir) / SPOOL_DIR / f"round-{round_id}")
    if acc is not None:
        attach_spool(acc, spool.directory / "stored")
    return spool


def attach_spool(acc: Any, directory: Path) -> bool:
    """Make a storing accumulator (median, trimmed mean, Krum; also inside wrappers' accumulators) keep its updates
    in `directory` instead of RAM. Returns whether one was found; streaming accumulators need none."""
    from fedllm.federation.aggregation.accumulators import StoringAccumulator

    seen = 0
    while acc is not None and seen < 8:  # wrappers nest a few deep at most
        if isinstance(acc, StoringAccumulator):
            acc.spool_to(directory)
            return True
        acc = getattr(acc, "inner", None)
        seen += 1
    return False
