"""Run a coordinator or a silo from settings: what `appliance coordinator start` and `appliance silo join` call."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ApplianceError, ConfigError, RoundFailed
from fedllm.core.tls import check_public_bind

if TYPE_CHECKING:
    from fedllm.core.sections import FederationSettings
    from fedllm.core.settings import ApplianceSettings
    from fedllm.federation.aggregation.server_strategies import Strategy

logger = logging.getLogger(__name__)


def build_strategy(cfg: "FederationSettings", *, lora_alpha: float | None = None) -> "Strategy":
    """The configured strategy, wrapped for differential privacy when `dp_mode` asks for it.

    Args:
        cfg: the federation settings (strategy, strategy_params, lora_aggregation, dp_mode, secure_aggregation).
        lora_alpha: the global adapter's `train.lora_alpha`, the scale of product aggregation (unless
            `strategy_params` sets one); without it products are taken at scale 1.

    Raises:
        ConfigError: unknown strategy or parameters, central DP over a non-mean strategy, or secure aggregation with
            a strategy that needs the individual updates (robust strategies, per-update clipping, central DP).
    """
    from fedllm.federation.aggregation import privacy
    from fedllm.federation.aggregation.server_strategies import ProductAggregation
    from fedllm.federation.aggregation.strategy_factory import make_strategy
    from fedllm.federation.aggregation.strategy_wrappers import FrozenA

    params = dict(cfg.strategy_params)
    if lora_alpha is not None:
        params.setdefault("lora_alpha", float(lora_alpha))
    name = cfg.strategy
    if cfg.lora_aggregation != "factors":
        params.setdefault("lora_aggregation", cfg.lora_aggregation)
    # Under DP, frozen A wraps the DP strategy (DP needs the mean strategy itself; A is reset after its noise).
    frozen_outside = cfg.dp_mode != "off" and (params.get("lora_aggregation") == "frozen_a" or name == "ffa")
    if frozen_outside:
        params["lora_aggregation"], name = "factors", "fedavg" if name == "ffa" else name
    try:
        strategy = make_strategy(name, min_results=cfg.min_silos, **params)
        if isinstance(strategy, ProductAggregation) and cfg.dp_mode != "off":
            raise ValueError(
                f"lora_aggregation=product needs each silo's own update; not with dp_mode={cfg.dp_mode} "
                f"(use lora_aggregation=frozen_a, which composes with DP and secure aggregation)"
            )
        if cfg.dp_mode == "central":
            strategy = privacy.CentralDP(strategy, cfg.dp_clip_norm, cfg.dp_noise_multiplier, delta=cfg.dp_delta)
        elif cfg.dp_mode == "silo":
            strategy = privacy.SiloDPAccounting(strategy, cfg.dp_noise_multiplier, delta=cfg.dp_delta)
        if frozen_outside:
            strategy = FrozenA(strategy)
    except ValueError as exc:
        raise ConfigError(f"federation strategy: {exc}") from exc
    if cfg.secure_aggregation:
        from fedllm.federation.aggregation.secure_round import check_strategy

        check_strategy(strategy, cfg)
    return strategy


def router_publisher(settings: "ApplianceSettings") -> Any:
    """A RouterPublisher for the local router (`serve.port`), with the stored admin token."""
    from fedllm.core.tls import client_context
    from fedllm.core.tokens import router_admin_token
    from fedllm.federation.publishing.gate import gate_for
    from fedllm.federation.publishing.publish import RouterPublisher

    token = router_admin_token(settings)
    fed = settings.federation
    api_key = fed.gate_api_key.get_secret_value() if fed.gate_api_key else None
    return RouterPublisher(
        f"{settings.serve.scheme}://127.0.0.1:{settings.serve.port}",
        token,
        max_attempts=0,
        verify=client_context(settings.tls_ca_file),
        gate=gate_for(settings),
        gate_prompts=fed.gate_prompts,
        api_key=api_key,
        regions=fed.serve_regions,
    )  # retry until a newer round supersedes it


async def _until_signal(done: "asyncio.Future | asyncio.Task") -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def run_coordinator(settings: "ApplianceSettings", *, on_ready=None, stay: bool = False) -> dict[str, Any]:
    """Run the federation to the end (or Ctrl-C); returns the final status document.

    With `stay` (`appliance up`), an ended run does not end the process: its status stays served and `POST /runs/next`
    starts the next run (federation/runtime/runs.py); only a signal ends it.

    Raises:
        RoundFailed: the run stopped after too many failed rounds (the CLI exits 1, so `appliance up` restarts it);
            not with `stay`, which keeps serving the failed run's status instead.
    """
    while True:
        final = _run_once(settings, on_ready)
        if not stay or final["phase"] == "stopped":
            break
        from fedllm.federation.runtime.runs import FinishedServer

        following = asyncio.run(FinishedServer(settings, final).wait())
        if following is None:
            break
        settings = following
        logger.info("starting run %s (up to round %d)", settings.federation.run_name, settings.federation.rounds)
    if final["phase"] == "failed" and not stay:
        last = next((r["failed"] for r in reversed(final["rounds"]) if "failed" in r), "see the coordinator's log")
        raise RoundFailed(f"run {final['run']} failed after {final['completed_rounds']} completed round(s): {last}")
    return final


def _run_once(settings: "ApplianceSettings", on_ready=None) -> dict[str, Any]:
    """One run of the federation to its end (or a signal): its final status document."""
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.wire.transport import check_plaintext_endpoint

    fed = settings.federation
    check_plaintext_endpoint(fed.bind_address or f"tcp://{fed.bind_host}:{fed.port}", fed.plaintext, "bind")
    model_dir = settings.models_dir / settings.model
    if not model_dir.exists():
        raise ConfigError(
            f"base model {settings.model!r} is not prepared in {settings.models_dir}; run `appliance model prepare`"
        )
    check_public_bind(
        "coordinator's status server",
        settings.federation.bind_host,
        settings.federation.tls_cert is not None,
        settings.env,
        "federation",
    )
    publishers = [router_publisher(settings)] if settings.federation.auto_publish else []

    async def main() -> dict[str, Any]:
        coord = Coordinator(
            settings, build_strategy(settings.federation, lora_alpha=settings.train.lora_alpha), on_publish=publishers
        )
        await coord.start()
        if on_ready is not None:
            on_ready(coord)
        try:
            assert coord.rounds_task is not None  # started above
            await _until_signal(coord.rounds_task)
        finally:
            await coord.stop()
        return coord.status()

    try:
        return asyncio.run(main())
    finally:
        for p in publishers:
            p.close()


def run_silo(settings: "ApplianceSettings", data: Path, eval_data: Path | None = None) -> list[int]:
    """Join the federation with the built-in engine trainer on `data`; returns the rounds this silo trained.

    Raises:
        ApplianceError: the coordinator refused this silo's key or removed it (the message names the key and the fix).
    """
    from fedllm.federation.runtime.silo import EngineTrainer, SiloClient, SiloTrainer

    model_dir = settings.models_dir / settings.model
    if not model_dir.exists():
        raise ConfigError(
            f"base model {settings.model!r} is not prepared in {settings.models_dir}; run `appliance model prepare`"
        )
    if settings.federation.silo_ranks > 1 or settings.train.hostfile:
        from fedllm.federation.runtime.rank_group import RankGroupTrainer

        trainer: SiloTrainer = RankGroupTrainer(
            settings.train,
            model_dir,
            Path(data),
            Path(eval_data) if eval_data else None,
            ranks=settings.federation.silo_ranks,
            hostfile=Path(settings.train.hostfile) if settings.train.hostfile else None,
        )
    else:
        trainer = EngineTrainer(settings.train, model_dir, Path(data), Path(eval_data) if eval_data else None)

    async def main() -> list[int]:
        silo = SiloClient(settings, trainer)
        await silo.start()
        try:
            await _until_signal(asyncio.create_task(silo.finished.wait()))
        finally:
            await silo.stop(say_bye=silo.refused is None)
            if hasattr(trainer, "close"):
                trainer.close()
        if silo.refused is not None:
            raise ApplianceError(silo.refused)
        return silo.rounds_done

    return asyncio.run(main())
