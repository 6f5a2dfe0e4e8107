"""Simulated silos: hundreds of real silo agents with a model-free trainer against the real coordinator.

Each simulated silo is a real `fedllm.federation.runtime.silo.SiloClient` (the product's protocol code, CURVE keys,
heartbeats, reconnects) whose trainer is `SimTrainer`: no model, no data; its "training" moves every weight by a small
seeded random amount. Hundreds of them run in one process (one asyncio loop; each has its own ZeroMQ context), so the
coordinator sees hundreds of real connections and updates of the real adapter's shapes while the machine does
almost no training work: this measures the coordinator (memory, round overhead, bytes), not the training.

Adapter shapes come from a model config, not weights (`lora_shapes`): the embedded model's (its `config.json` in the
model store, else SmolLM2-135M's known dimensions) at `train.lora_r` on its default targets, or a 7B Llama at r=16 on
every linear layer (~40M parameters).

`appliance sim silos N` is the thin CLI; `bench/federation_scale.py` runs the coordinator part and the silos part in
separate processes to measure the coordinator's own peak memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedllm.core.types import StateDict
from fedllm.federation.runtime.silo import SiloTrainer
from fedllm.federation.wire.keys import KeyPair

logger = logging.getLogger(__name__)

# SmolLM2-135M (the embedded model) and Llama-2-7B: the dimensions LoRA's shapes depend on.
EMBEDDED_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}
LLAMA_7B_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = ("embedded", "7b")
COORDINATOR_FILE = "sim-coordinator.json"  # the coordinator part's address and public key, for the silos part


def lora_shapes(config: Mapping[str, Any], r: int, targets: list[str]) -> dict[str, tuple[int, ...]]:
    """The peft state-dict keys and shapes of a LoRA adapter of rank `r` on `targets` of a Llama-architecture model,
    from its config alone (no weights).

    Raises:
        ValueError: a target that is not a linear layer of a Llama block.
    """
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    linear = {
        "q_proj": ("self_attn", hidden, heads * head_dim),
        "k_proj": ("self_attn", hidden, kv * head_dim),
        "v_proj": ("self_attn", hidden, kv * head_dim),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ValueError(f"targets {unknown} are not linear layers of a Llama block ({', '.join(linear)})")
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for name in targets:
            block, fan_in, fan_out = linear[name]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            shapes[f"{prefix}.lora_A.weight"] = (r, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, r)
    return shapes


def preset_shapes(preset: str, settings: Any = None) -> tuple[dict[str, tuple[int, ...]], str]:
    """(shapes, a one-line description) of a named adapter size: `embedded` (the embedded model at `train.lora_r` on
    its default targets; its config.json from the model store when prepared) or `7b` (Llama-2-7B, r=16, all linear).

    Raises:
        ValueError: an unknown preset.
    """
    if preset == "7b":
        return lora_shapes(LLAMA_7B_CONFIG, 16, ALL_LINEAR), "Llama-2-7B LoRA r=16 on all linear layers"
    if preset != "embedded":
        raise ValueError(f"unknown adapter preset {preset!r}; expected one of {', '.join(PRESETS)}")
    config, source, r, targets = dict(EMBEDDED_CONFIG), "built-in SmolLM2-135M dimensions", 8, None
    if settings is not None:
        r, targets = settings.train.lora_r, settings.train.target_modules
        path = settings.models_dir / settings.model / "config.json"
        if path.is_file():
            config.update(json.loads(path.read_text(encoding="utf-8")))
            source = str(path)
    if config.get("model_type") != "llama":
        raise ValueError(f"the embedded model's config ({source}) is not a Llama architecture")
    from fedllm.train.lora import default_targets

    targets = targets or default_targets("llama")
    return lora_shapes(config, r, targets), f"embedded model LoRA r={r} on {','.join(targets)} ({source})"


def initial_state(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> StateDict:
    """A LoRA-like starting adapter: small random A, zero B (as peft initialises one)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(*s, generator=g) * 0.01 if ".lora_A." in k else torch.zeros(*s)) for k, s in shapes.items()}


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Number of weights in an adapter of these shapes."""
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


class SimTrainer(SiloTrainer):
    """A model-free `SiloTrainer`: `fit` sleeps `fit_s` and the new state is the global one plus `step` x seeded noise.

    It holds nothing between rounds (the state is computed in `get_state`, which releases the global adapter it was
    given), so hundreds fit in one process even at large adapter sizes.
    """

    def __init__(self, index: int, examples: int = 10, step: float = 0.01, fit_s: float = 0.0) -> None:
        self.index, self.examples, self.step, self.fit_s = index, examples, step, fit_s
        self._base: StateDict = {}
        self.rounds = 0

    def get_state(self) -> StateDict:
        g = torch.Generator().manual_seed(100_003 * self.index + self.rounds)
        state = {k: v + self.step * torch.randn(v.shape, generator=g) for k, v in self._base.items()}
        self._base = {}
        return state

    def set_state(self, state: StateDict) -> None:
        self._base = state

    def fit(self, steps: int, config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        self.rounds += 1
        if self.fit_s > 0:
            time.sleep(self.fit_s)
        return self.examples, {"train_loss": 1.0 / (1 + self.rounds)}

    def evaluate(self) -> dict[str, float]:
        return {}


def make_keypairs(n: int, prefix: str = "sim") -> dict[str, KeyPair]:
    """`n` fresh CURVE key pairs, named `PREFIX-0000`, ... (generated in this process: milliseconds for hundreds)."""
    import zmq

    out = {}
    for i in range(n):
        public, secret = zmq.curve_keypair()
        out[f"{prefix}-{i:04d}"] = KeyPair(public.decode("ascii"), secret.decode("ascii"))
    return out


def coordinator_settings(home: Path, n: int, rounds: int, **federation: Any) -> Any:
    """Settings for a simulated federation's coordinator under `home`: loopback, free ports, CURVE, `min_silos=n`."""
    from fedllm.core.settings import load_settings

    fed = {
        "bind_host": "127.0.0.1",
        "port": 0,
        "status_port": 0,
        "rounds": rounds,
        "min_silos": n,
        "run_name": "sim",
        "local_steps": 1,
        **federation,
    }
    return load_settings(overrides={"home": str(home), "federation": fed})


async def run_coordinator(
    settings: Any, state: StateDict, *, ready: Path | None = None, timeout_s: float = 3600.0
) -> list[dict[str, Any]]:
    """Run the real coordinator (CURVE, no adapter registry) until its last round; returns its round records.

    With `ready`, writes `{"address", "public_key", "keys_dir"}` there once the socket is bound (the silos part reads
    it).
    """
    from fedllm.core.atomic import write_json_atomic
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.runtime.service import build_strategy
    from fedllm.federation.wire.keys import ensure_keypair

    keys = ensure_keypair(settings.keys_dir, "coordinator")
    strategy = build_strategy(settings.federation, lora_alpha=settings.train.lora_alpha)
    coord = Coordinator(settings, strategy, initial_state=state, exporter=False)
    address = await coord.start()
    if ready is not None:
        write_json_atomic(ready, {"address": address, "public_key": keys.public, "keys_dir": str(settings.keys_dir)})
    try:
        await coord.wait_done(timeout_s)
    finally:
        await coord.stop()
    return list(coord.history)


async def run_silos(
    settings: Any,
    keypairs: Mapping[str, KeyPair],
    address: str,
    coordinator_key: str,
    *,
    examples: int = 10,
    fit_s: float = 0.0,
    timeout_s: float = 3600.0,
) -> int:
    """Run one `SiloClient` per key pair (enrolled already) with a `SimTrainer` until the coordinator says the run is
    done; returns how many rounds the silos trained in all."""
    from fedllm.federation.runtime.silo import SiloClient

    silos = []
    for i, (name, kp) in enumerate(sorted(keypairs.items())):
        fed = settings.federation.model_copy(
            update={"coordinator": address, "coordinator_key": coordinator_key, "silo_id": name, "plaintext": False}
        )
        silos.append(
            SiloClient(
                settings.model_copy(update={"federation": fed}),
                SimTrainer(i, examples=examples, fit_s=fit_s),
                keypair=kp,
            )
        )
    try:
        for silo in silos:
            await silo.start()
        await asyncio.wait_for(asyncio.gather(*(s.wait_finished() for s in silos)), timeout_s)
    finally:
        for silo in silos:
            await silo.stop(say_bye=False)
    refused = [s.refused for s in silos if s.refused]
    if refused:
        raise RuntimeError(f"{len(refused)} simulated silo(s) were refused: {refused[0]}")
    return sum(len(s.rounds_done) for s in silos)


async def wait_for_file(path: Path, timeout_s: float = 120.0) -> dict[str, Any]:
    """The JSON in `path` once it exists."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
    return json.loads(path.read_text(encoding="utf-8"))


async def silos_part(home: Path, n: int, *, examples: int = 10, fit_s: float = 0.0, timeout_s: float = 3600.0) -> int:
    """The silos of a simulation whose coordinator part runs under `home`: wait for it, enrol `n` fresh keys in its
    enrolment, run them until the run is done."""
    from fedllm.core.settings import load_settings
    from fedllm.federation.wire.keys import enroll_silos

    info = await wait_for_file(Path(home) / COORDINATOR_FILE, timeout_s=timeout_s)
    keypairs = make_keypairs(n)
    enroll_silos(Path(info["keys_dir"]), {name: kp.public for name, kp in keypairs.items()})
    settings = load_settings(overrides={"home": str(Path(home) / "silos")})
    return await run_silos(
        settings, keypairs, info["address"], info["public_key"], examples=examples, fit_s=fit_s, timeout_s=timeout_s
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM of its own address space.

    Not `ru_maxrss`: after a fork and exec it still counts the parent's pages, so a coordinator started from a big
    test process would report that.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: participants, seconds outside training (the round's duration less its slowest silo's training),
    bytes in and out."""
    rows = []
    for r in history:
        if "failed" in r:
            rows.append({"round": r["round"], "failed": r["failed"]})
            continue
        rows.append(
            {
                "round": r["round"],
                "participants": len(r["participants"]),
                "overhead_s": round(r["duration_s"] - r["train_s_max"], 3),
                "bytes": r["bytes_in"] + r["bytes_out"],
            }
        )
    return rows


async def simulate(
    home: Path,
    n: int,
    rounds: int,
    *,
    preset: str = "embedded",
    fit_s: float = 0.0,
    timeout_s: float = 3600.0,
    model_settings: Any = None,
    **federation: Any,
) -> dict[str, Any]:
    """A whole simulation in this process: the coordinator and `n` simulated silos. Returns the report
    (`rounds`: `round_rows`, `history`, `adapter`, `parameters`). `model_settings`: whose model store and
    `train.lora_r` size the embedded preset (default: the simulation's own, fresh, settings)."""
    settings = coordinator_settings(home, n, rounds, **federation)
    shapes, about = preset_shapes(preset, model_settings or settings)
    ready = Path(home) / COORDINATOR_FILE
    ready.unlink(missing_ok=True)
    coordinator = asyncio.create_task(
        run_coordinator(settings, initial_state(shapes), ready=ready, timeout_s=timeout_s)
    )
    silos = asyncio.create_task(silos_part(home, n, fit_s=fit_s, timeout_s=timeout_s))
    done, _ = await asyncio.wait({coordinator, silos}, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        failure = task.exception()
        if failure is not None:
            for other in (coordinator, silos):
                other.cancel()
            raise failure
    history = await coordinator
    await silos
    return {
        "silos": n,
        "adapter": about,
        "parameters": parameter_count(shapes),
        "rounds": round_rows(history),
        "history": history,
    }


async def coordinator_part(
    home: Path,
    n: int,
    rounds: int,
    *,
    preset: str = "embedded",
    timeout_s: float = 3600.0,
    model_settings: Any = None,
    **federation: Any,
) -> dict[str, Any]:
    """The coordinator of a simulation under `home` (the silos part runs elsewhere with the same `home`): runs the
    rounds and reports them with this process's resident memory after start-up and its peak."""
    settings = coordinator_settings(Path(home) / "coordinator", n, rounds, **federation)
    shapes, about = preset_shapes(preset, model_settings or settings)
    state = initial_state(shapes)
    ready = Path(home) / COORDINATOR_FILE
    ready.unlink(missing_ok=True)
    import aiohttp.web  # noqa: F401 - what the coordinator imports as it starts: counted in the start, not the rounds

    from fedllm.federation.runtime import coordinator as _coordinator  # noqa: F401 - likewise
    from fedllm.federation.runtime import service as _service  # noqa: F401 - likewise

    started_rss = current_rss_bytes()
    history = await run_coordinator(settings, state, ready=ready, timeout_s=timeout_s)
    return {
        "silos": n,
        "adapter": about,
        "parameters": parameter_count(shapes),
        "rounds": round_rows(history),
        "start_rss_bytes": started_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "history": history,
    }
