"""Helpers for the federation service tests: a pure-tensor fake trainer and settings on loopback."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import pytest
import torch

from fedllm.federation.runtime.silo import SiloTrainer
from fedllm.testing.exporters import write_exporter  # noqa: F401 - the federation tests import it from here
from fedllm.testing.factories import make_settings
from fedllm.testing.factories import wait_until_async as wait_for  # noqa: F401 - the federation tests import it from here

SHAPES = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 16),
          "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": (16, 4)}


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small adapter-shaped state dict."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


class FakeTrainer(SiloTrainer):
    """A SiloTrainer without a model: `fit` moves every weight by a silo-specific, round-specific amount.

    It holds private `data` rows (`{"text": ...}`) and, like a careless training loop, reports text from them among
    its metrics (`sample`): what leaves the silo must never carry it.
    """

    def __init__(self, index: int, examples: int = 10, data: Sequence[dict] | None = None) -> None:
        self.index, self.examples = index, examples
        self.data = list(data or [{"text": f"PATIENT RECORD 47{index}1"}])
        self.state: dict[str, torch.Tensor] = {}
        self.calls: list[dict[str, Any]] = []
        self.fit_delay_s = 0.0

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = {k: v.clone() for k, v in state.items()}

    def fit(self, steps, config):
        import time

        self.calls.append({"steps": steps, "config": dict(config)})
        time.sleep(self.fit_delay_s)
        g = torch.Generator().manual_seed(1000 * self.index + len(self.calls))
        self.state = {k: v + 0.01 * (self.index + 1) * torch.randn(v.shape, generator=g) for k, v in self.state.items()}
        text = " ".join(row["text"] for row in self.data)
        return self.examples, {"train_loss": 1.0 / (self.index + 1), "note_len": float(len(text)), "sample": text}

    def evaluate(self):
        return {"eval_loss": 0.5}


def fed_settings(home: Path, *, plaintext: bool = False, **fed: Any):
    """Settings for a fast federation on 127.0.0.1 with free ports."""
    base = dict(bind_host="127.0.0.1", port=0, status_port=0, plaintext=plaintext, rounds=3, min_silos=2,
                round_deadline_s=20.0, heartbeat_interval_s=0.2, silo_timeout_s=1.5, local_steps=2,
                compression="fp32", run_name="testrun", start_timeout_s=20.0)
    base.update(fed)
    return make_settings(home, federation=base)


def silo_settings(home: Path, coordinator: str, silo_id: str, coordinator_key: str | None = None, plaintext: bool = False, **fed: Any):
    base = dict(coordinator=coordinator, coordinator_key=coordinator_key, silo_id=silo_id, plaintext=plaintext,
                heartbeat_interval_s=0.2, silo_timeout_s=1.5)
    base.update(fed)
    return make_settings(home, federation=base)


@asynccontextmanager
async def federation(home: Path, trainers: Sequence[Any], *, strategy: Any = None, initial: dict | None = None,
                     exporter: Any = False, on_publish: list | None = None, curve: tuple | None = None,
                     silo_cls: Callable[[Any, Any], Any] | None = None,
                     route: Callable[[int, str], Awaitable[str]] | None = None,
                     **fed: Any) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A started coordinator with one started silo per trainer on loopback; everything is stopped on exit.

    Plaintext with silos `s0, s1, ...` under `home`, or CURVE with `curve=curve_homes` (silos named as enrolled).
    `strategy` (an object, or a name for the settings) defaults to `build_strategy(settings)`, `initial` to `initial_state()`; `silo_cls(settings, trainer)` makes
    each silo (default `SiloClient`); `await route(i, address)` gives the address silo i connects to (e.g. a
    `fedllm.testbed.link.Link` in front of the coordinator). Yields `(coordinator, silos)`.
    """
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.runtime.service import build_strategy
    from fedllm.federation.runtime.silo import SiloClient

    silo_cls = silo_cls or SiloClient
    if isinstance(strategy, str):  # a name: it goes into the settings, and build_strategy builds it
        fed["strategy"], strategy = strategy, None
    if curve is not None:
        coord_home, coord_keys, silo_homes = curve
        settings = fed_settings(coord_home, **fed)
        homes = list(silo_homes.items())
        key = coord_keys.public
    else:
        settings = fed_settings(home / "c", plaintext=True, **fed)
        homes = [(f"s{i}", home / f"s{i}") for i in range(len(trainers))]
        key = None
    strategy = strategy or build_strategy(settings.federation, lora_alpha=settings.train.lora_alpha)
    coord = Coordinator(settings, strategy, initial_state=initial or initial_state(),
                        exporter=exporter, on_publish=on_publish)
    address = await coord.start()
    silo_kw = {k: fed[k] for k in ("heartbeat_interval_s", "silo_timeout_s") if k in fed}  # silos keep the coordinator's
    silo_kw.update({k: fed[k] for k in ("end_silence_s",) if k in fed})
    silos = [silo_cls(silo_settings(h, await route(i, address) if route else address, name, key, plaintext=curve is None,
                                    **silo_kw), t)
             for i, ((name, h), t) in enumerate(zip(homes, trainers))]
    try:
        for s in silos:
            await s.start()
        yield coord, silos
    finally:
        for s in silos:
            await s.stop()
        await coord.stop()


@pytest.fixture
def curve_homes(tmp_path: Path):
    """A coordinator home with a key pair and three enrolled silos, each with its own home and key pair."""
    from fedllm.federation.wire.keys import enroll_silo, ensure_keypair

    coord_home = tmp_path / "coord"
    coord_keys = ensure_keypair(make_settings(coord_home).keys_dir, "coordinator")
    silos = {}
    for name in ("alpha", "beta", "gamma"):
        home = tmp_path / name
        kp = ensure_keypair(make_settings(home).keys_dir, "silo")
        enroll_silo(make_settings(coord_home).keys_dir, name, kp.public)
        silos[name] = home
    return coord_home, coord_keys, silos
