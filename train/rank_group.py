"""A rank group that outlives one training call: N ranks started once, trained many times (a silo's rounds).

`RankGroup(ranks)` starts `python -m fedllm.train.rank_group SOCKET` on N ranks under DeepSpeed's launcher (one node, or
the nodes of a hostfile whose first host is this one). Rank 0 connects back to this process over a Unix socket in a
private (0700) folder. Each `fit(...)` sends rank 0 a command and the starting adapter; rank 0 broadcasts both to
the other ranks over torch.distributed, every rank runs its `train.Trainer` (kept across calls) on its share of the
global batches (ZeRO shards across the ranks), and rank 0 sends back the trained adapter, its example count and metrics.

A rank that dies makes the launcher stop the others; the pending call raises `RankGroupFailed` instead of hanging,
and the next call starts a fresh group. Messages are a JSON header and a safetensors payload, never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.processes import open_private_log
from fedllm.core.types import StateDict
from fedllm.train.distributed import free_port, launch_env, launcher_command, remove_shm_buffers, stop_process_group
from fedllm.train.engine import FitResult, TrainingFailed

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

_LEN = struct.Struct(">Q")


class RankGroupFailed(TrainingFailed):
    """The rank group died or stopped answering during a call; the next call starts a new group."""


# ---------------------------------------------------------------- messages: JSON header + safetensors payload


def pack(header: dict[str, Any], state: StateDict | None = None) -> bytes:
    """One message as bytes: 8-byte header length, the JSON header, then the safetensors bytes of `state`."""
    from safetensors.torch import save

    head = json.dumps(header).encode()
    body = save({k: v.contiguous() for k, v in state.items()}) if state else b""
    return _LEN.pack(len(head)) + head + body


def unpack(blob: bytes) -> tuple[dict[str, Any], StateDict]:
    """The (header, state) of a `pack`ed message."""
    from safetensors.torch import load

    n = _LEN.unpack_from(blob)[0]
    header = json.loads(blob[_LEN.size : _LEN.size + n])
    body = blob[_LEN.size + n :]
    return header, (load(body) if body else {})


def _send(sock: socket.socket, blob: bytes) -> None:
    sock.sendall(_LEN.pack(len(blob)) + blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the rank group closed its connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    return _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])


# ---------------------------------------------------------------- the caller's side


class RankGroup:
    """N training ranks kept alive across calls (see the module docstring).

    Args:
        ranks: ranks per node (GPUs; CPU processes with gloo on a CPU-only machine).
        hostfile: a DeepSpeed hostfile to span several nodes (this host first: rank 0 dials back over a Unix socket).
        start_timeout_s: how long the ranks may take to start and report ready.
    """

    def __init__(self, ranks: int, *, hostfile: Path | None = None, start_timeout_s: float = 600.0) -> None:
        self.ranks, self.hostfile, self.start_timeout_s = ranks, hostfile, start_timeout_s
        self.starts = 0  # how many times a group was started (1 across a healthy run)
        self.busy = False  # a call is in flight
        self._proc: subprocess.Popen | None = None
        self._port = 0  # the master port of the current launch (its shared-memory buffers are named by it)
        self._conn: socket.socket | None = None
        self._dir: Path | None = None
        self.world_size = 0

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._conn is not None

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the current group's ranks (each rank writes its pid file when it starts)."""
        if self._dir is None:
            return {}
        return {
            int(p.stem.split("-")[1]): int(p.read_text()) for p in self._dir.glob("rank-*.pid") if p.read_text().strip()
        }

    def start(self) -> None:
        """Start the ranks and wait until rank 0 reports the group ready.

        Raises:
            RankGroupFailed: the launcher exited or the ranks did not report within start_timeout_s.
        """
        self.close()
        self._dir = Path(tempfile.mkdtemp(prefix="rank-group-"))  # 0700: only this user reaches the socket
        path = self._dir / "ctl.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(0.5)
        self._port = free_port()
        cmd = launcher_command(
            self.ranks, [str(path)], hostfile=self.hostfile, module="fedllm.train.rank_group", master_port=self._port
        )
        log_path = self._dir / "launcher.log"
        with open_private_log(log_path) as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=launch_env(), start_new_session=True
            )
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while self._conn is None:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RankGroupFailed(
                        f"the {self.ranks}-rank group did not start (launcher exit code {self._proc.poll()}); "
                        f"{log_path} ends with:\n{self.log_tail()}"
                    )
                try:
                    self._conn, _ = listener.accept()
                except socket.timeout:
                    continue
            ready, _ = unpack(self._wait_reply(deadline))
            self.world_size = int(ready["world_size"])
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
        log.info("rank group ready: %d ranks (start %d)", self.world_size, self.starts)

    def log_tail(self, chars: int = 3000) -> str:
        if self._dir is None or not (self._dir / "launcher.log").exists():
            return ""
        return (self._dir / "launcher.log").read_text(encoding="utf-8", errors="replace")[-chars:]

    def _wait_reply(self, deadline: float | None = None) -> bytes:
        """The next message from rank 0, watching the launcher meanwhile (a dead group raises, never hangs)."""
        assert self._conn is not None and self._proc is not None
        self._conn.settimeout(1.0)
        while True:
            try:
                return _recv(self._conn)
            except socket.timeout:
                if self._proc.poll() is not None:
                    raise RankGroupFailed(
                        f"the rank group exited (code {self._proc.returncode}) during the call:\n{self.log_tail()}"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    raise RankGroupFailed("the rank group did not answer in time")
            except (ConnectionError, OSError) as exc:
                raise RankGroupFailed(f"the rank group failed during the call ({exc}):\n{self.log_tail()}") from exc

    def call(self, header: dict[str, Any], state: StateDict | None = None) -> tuple[dict[str, Any], StateDict]:
        """Send one command (starting the group first if it is not alive); returns rank 0's (header, state).

        Raises:
            RankGroupFailed: the group died during the call (it is torn down; the next call starts a new one).
        """
        if not self.alive:
            self.start()
        self.busy = True
        try:
            assert self._conn is not None
            self._conn.settimeout(None)
            _send(self._conn, pack(header, state))
            reply, out = unpack(self._wait_reply())
        except BaseException:
            self.close()
            raise
        finally:
            self.busy = False
        if reply.get("op") == "error":
            raise RankGroupFailed(f"rank 0: {reply.get('message')}")
        return reply, out

    def fit(
        self,
        cfg: "TrainSettings",
        model_dir: Path,
        data: Path,
        *,
        init_state: StateDict | None = None,
        max_steps: int | None = None,
        eval_data: Path | None = None,
        run_dir: Path | None = None,
        **fit_kwargs: Any,
    ) -> FitResult:
        """`Trainer.fit` on every rank of the group, each rank's Trainer kept between calls (the loaded base model, the
        optimizer state): `fit_kwargs` are further `train.TrainPlan` fields; data as JSONL paths the ranks can read."""
        header = {
            "op": "fit",
            "train": cfg.model_dump(mode="json"),
            "model_dir": str(model_dir),
            "data": str(data),
            "eval_data": str(eval_data) if eval_data else None,
            "run_dir": str(run_dir) if run_dir else None,
            "max_steps": max_steps,
            "has_init": init_state is not None,
            "kwargs": fit_kwargs,
        }
        reply, state = self.call(header, init_state)
        return FitResult(state=state, num_examples=int(reply["num_examples"]), metrics=reply["metrics"])

    def close(self) -> None:
        """Ask the ranks to stop, then stop the launcher's process group; remove the private folder."""
        if self._conn is not None:
            try:
                self._conn.settimeout(2.0)
                _send(self._conn, pack({"op": "stop"}))
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_process_group(self._proc)
            self._proc = None
            remove_shm_buffers(self._port)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# ---------------------------------------------------------------- the ranks' side


def _broadcast_blob(blob: bytes | None, rank: int) -> bytes:
    """Rank 0's bytes on every rank (a length, then the bytes, as uint8 tensors)."""
    import torch
    import torch.distributed as dist

    if rank == 0 and blob is None:
        raise ValueError("rank 0 broadcasts the command it received: it has no bytes to send")
    data = bytearray(blob) if rank == 0 and blob is not None else bytearray()  # other ranks send nothing
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = (
        torch.frombuffer(data, dtype=torch.uint8).to(device)
        if rank == 0
        else torch.empty(int(size), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy().tobytes())


def serve_ranks(socket_path: str) -> None:
    """A rank's life: join the group, then run every command rank 0 receives until `stop`."""
    import torch.distributed as dist

    from fedllm.train.engine import init_distributed
    from fedllm.train.trainer import Trainer, TrainPlan

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    (Path(socket_path).parent / f"rank-{rank}.pid").write_text(str(os.getpid()))
    conn = None
    trainer: Trainer | None = None  # kept across calls: the loaded base model and the optimizer state
    if rank == 0:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(socket_path)
        _send(conn, pack({"op": "ready", "world_size": world}))
    while True:
        blob = _broadcast_blob(_recv(conn) if conn is not None else None, rank)
        header, state = unpack(blob)
        if header["op"] == "stop":
            break
        if header["op"] != "fit":
            raise ValueError(f"unknown rank-group command {header['op']!r}")
        from fedllm.core.sections.train import TrainSettings

        kwargs = dict(header["kwargs"])
        if kwargs.get("schedule_span") is not None:
            kwargs["schedule_span"] = tuple(kwargs["schedule_span"])
        cfg, model_dir = TrainSettings(**header["train"]), Path(header["model_dir"])
        if trainer is None or trainer.model_dir != model_dir:
            trainer = Trainer(cfg, model_dir, keep_base=True)
        trainer.cfg = cfg
        result = trainer.fit(
            TrainPlan(
                Path(header["data"]),
                init_state=state if header["has_init"] else None,
                max_steps=header["max_steps"],
                eval_data=Path(header["eval_data"]) if header["eval_data"] else None,
                run_dir=Path(header["run_dir"]) if header["run_dir"] else None,
                **kwargs,
            )
        )
        if conn is not None:
            _send(
                conn,
                pack({"op": "result", "num_examples": result.num_examples, "metrics": result.metrics}, result.state),
            )
    if conn is not None:
        conn.close()


def main(argv: Sequence[str]) -> int:
    """Run one rank of the group (`python -m fedllm.train.rank_group SOCKET`); the exit status (1: the rank failed)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank-group: %(message)s")
    positional = [a for a in argv if not a.startswith("--local_rank")]  # the launcher adds --local_rank=R
    try:
        serve_ranks(positional[0])
    except Exception:  # a failed rank exits non-zero: the launcher then stops the others and the caller sees it
        log.exception("rank %s failed", os.environ.get("RANK"))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
