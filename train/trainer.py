"""A `Trainer` holds what a long-lived process keeps between trainings; a `TrainPlan` says what one training does.

A silo trains once per round and a rank group once per call, on the same base model: a Trainer keeps that base loaded
(with `keep_base`, except under ZeRO-3, which partitions the base weights) and, for plans that ask for it, the
optimizer's state (AdamW moments and step count), so that a silo's rounds continue one optimizer as one long run
would. `fit_adapter` is the one-shot convenience: a fresh Trainer for one plan.

    trainer = Trainer(cfg, model_dir, keep_base=True)
    r1 = trainer.fit(TrainPlan("data.jsonl", max_steps=20, schedule_span=(0, 60), keep_optimizer=True,
                               reset_optimizer=True))
    r2 = trainer.fit(TrainPlan("data.jsonl", init_state=r1.state, max_steps=20, schedule_span=(20, 60),
                               keep_optimizer=True))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.types import StateDict
from fedllm.train import data as datamod
from fedllm.train import lora, memory, optimizer_memory
from fedllm.train.engine import (
    FitResult,
    Progress,
    TrainingFailed,
    deepspeed_config,
    evaluate_engine,
    gathered_state,
    init_distributed,
    loss_module,
    lr_lambda,
    plan_steps,
    prepare_rows,
    resolve_precision,
    set_threads,
    sum_over_ranks,
)
from fedllm.train.run_folder import RunFolder, run_config

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

Records = Path | Sequence[dict[str, Any]]


@dataclass(frozen=True)
class TrainPlan:
    """What one training does (the settings, model and what is kept between trainings are the Trainer's).

    Attributes:
        data: a JSONL path or records in any supported format.
        init_state: adapter weights to start from (default: a fresh LoRA seeded by cfg.seed).
        max_steps: optimizer steps; overrides cfg.epochs / cfg.max_steps.
        eval_data: held-out records; else cfg.eval_fraction of `data` is held out. Evaluated at the end.
        prox_mu: FedProx: adds (mu/2)*||w - init_state||^2 over the LoRA weights (needs init_state, else the
            fresh initial state is the reference).
        schedule_span: `(offset, total)`: this call's steps are steps offset.. of one run of `total` steps that spans
            several calls, such as a federation's rounds: of its LR schedule (warmup then cfg.lr_scheduler) and of
            its pass over the data (micro-batches continue from batch offset, so consecutive calls see consecutive
            batches rather than the first ones again). None: both start afresh at this call's first step.
        keep_optimizer: start from the optimizer state the Trainer kept from its previous such call, when it fits
            (same trainable shapes, ZeRO stage and ranks; else a fresh optimizer, logged), and keep this call's
            state for the next. False: a fresh optimizer, and what the Trainer keeps is left as it is.
        reset_optimizer: drop the kept optimizer state first (a federation's first round).
        settings: train-settings fields changed for this call only (a round's `lr_scheduler`, `lora_freeze_a`).
        run_dir: where config.json, status.json, metrics.jsonl, train.log and checkpoints/ go; None writes nothing.
        progress: called after every optimizer step with the metrics.jsonl record.
        resume: continue from the latest checkpoint in run_dir/checkpoints (exactly, same steps and batches).
    """

    data: Records
    init_state: StateDict | None = None
    max_steps: int | None = None
    eval_data: Records | None = None
    prox_mu: float = 0.0
    schedule_span: tuple[int, int] | None = None
    keep_optimizer: bool = False
    reset_optimizer: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    progress: Progress | None = None
    resume: bool = False


class BaseModels:
    """Loaded base models kept between trainings, by folder and dtype, without LoRA layers and frozen.

    A model is taken out while it trains (a second, concurrent training loads its own) and put back when that training
    ends well. Only frozen base weights are kept, which training never writes. A Trainer with `keep_base` has its own;
    Trainers of one process that train one after the other (several silos of a demo) may share one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], Any] = {}

    @staticmethod
    def _key(model_dir: Path, dtype: Any) -> tuple[str, str]:
        return str(Path(model_dir).resolve()), str(dtype)

    def take(self, model_dir: Path, dtype: Any) -> Any:
        """The kept base model of this folder and dtype, else one loaded from disk."""
        with self._lock:
            model = self._idle.pop(self._key(model_dir, dtype), None)
        if model is not None:
            log.debug("reusing the loaded base model of %s", model_dir)
            return model
        return lora.load_base_model(model_dir, dtype)

    def keep(self, peft_model: Any, model_dir: Path, dtype: Any) -> None:
        """Remove the LoRA layers from a peft model built on `take` and keep its base for the next training."""
        base = lora.unload_base(peft_model)
        with self._lock:
            self._idle[self._key(model_dir, dtype)] = base

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)


class Trainer:
    """Trains LoRA adapters of one base model, keeping the loaded base (`keep_base`) and optimizer state between calls.

    Args:
        cfg: the train settings section (`cfg` may be replaced between calls; `TrainPlan.settings` changes one call).
        model_dir: an HF model folder (the base model).
        keep_base: keep the loaded base model for the next call instead of loading it from disk each time (a silo's
            or a rank group's rounds); ZeRO-3 always loads. Two calls at once each get a base of their own.
        bases: where the kept base waits (default: this Trainer's own); Trainers that train one after the other in
            one process can share one, so that they hold a single copy.
    """

    def __init__(
        self, cfg: "TrainSettings", model_dir: Path, *, keep_base: bool = False, bases: BaseModels | None = None
    ) -> None:
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.bases = (bases if bases is not None else BaseModels()) if keep_base else None
        self._lock = threading.Lock()
        self._optimizer: optimizer_memory.KeptOptimizer | None = None

    def fit(self, plan: TrainPlan) -> FitResult:
        """Train a LoRA adapter as `plan` says and return its state.

        Returns:
            FitResult(state, num_examples, metrics) with train_loss (mean of the last steps), steps, tokens,
            tokens_per_s, elapsed_s and eval_loss/perplexity when there is eval data.

        Raises:
            DataError: invalid data (all problems listed). ConfigError: settings that cannot work.
            TrainingFailed: anything failing during training (status.json records it).
        """
        cfg = self.cfg.model_copy(update=dict(plan.settings)) if plan.settings else self.cfg
        records = datamod.load_data(plan.data)
        if plan.eval_data is not None:
            train_records, eval_records = records, datamod.load_data(plan.eval_data)
        else:
            train_records, eval_records = datamod.split_eval(records, cfg.eval_fraction, cfg.seed)
        run = RunFolder(plan.run_dir)
        run.start(run_config(cfg, self.model_dir, plan.data, eval_data=plan.eval_data, max_steps=plan.max_steps))
        handler = run.attach_log()
        try:
            result = self._train(cfg, plan, train_records, eval_records, run)
        except BaseException as exc:
            state = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            run.finish(state, exit_code=130 if state == "stopped" else 1, error=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, (ApplianceError, KeyboardInterrupt)) or not isinstance(exc, Exception):
                raise
            raise TrainingFailed(f"training failed: {type(exc).__name__}: {exc}") from exc
        finally:
            run.detach_log(handler)
        run.finish("done", exit_code=0)
        return result

    def forget_optimizer(self) -> None:
        """Drop the kept optimizer state (the next `keep_optimizer` call starts a fresh optimizer)."""
        with self._lock:
            self._optimizer = None

    # -- what is kept between calls --
    def _restore_optimizer(self, optimizer: Any, reset: bool) -> None:
        with self._lock:
            if reset:
                self._optimizer = None
            kept = self._optimizer
        if kept is not None:
            optimizer_memory.restore(kept, optimizer)

    # -- one training --
    def _train(
        self,
        cfg: "TrainSettings",
        plan: TrainPlan,
        train_records: list[dict[str, Any]],
        eval_records: list[dict[str, Any]],
        run: RunFolder,
    ) -> FitResult:
        import deepspeed
        import torch
        import torch.distributed as dist

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        set_threads(cfg.threads)
        init_distributed()
        rank, world = dist.get_rank(), dist.get_world_size()
        precision = resolve_precision(cfg.precision)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        tokenizer = lora.load_tokenizer(self.model_dir)
        rows = prepare_rows(cfg, tokenizer, train_records)
        eval_examples = datamod.tokenize_records(tokenizer, eval_records, cfg.max_seq_len) if eval_records else []
        eval_rows = datamod.unpacked_rows(eval_examples) if eval_records else []
        total_steps = plan_steps(cfg, len(rows), plan.max_steps)

        bases = self.bases if cfg.zero_stage < 3 else None  # ZeRO-3 partitions the base weights: never kept
        base = bases.take(self.model_dir, dtype) if bases is not None else None
        peft_model = lora.build_peft_model(cfg, self.model_dir, dtype, plan.init_state, base=base)
        lora.set_gradient_checkpointing(peft_model, cfg.gradient_checkpointing)
        if cfg.lora_freeze_a:
            lora.freeze_lora_a(peft_model)
        ref = plan.init_state
        if ref is None and plan.prox_mu > 0:
            ref = lora.adapter_state(peft_model)
        module = loss_module(peft_model, ref, plan.prox_mu, cfg.zero_stage, world)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        offset, span = plan.schedule_span if plan.schedule_span is not None else (0, total_steps)
        if offset < 0 or span < offset + 1:
            raise ConfigError(f"schedule_span {plan.schedule_span} must be (offset >= 0, total > offset)")
        schedule = lr_lambda(cfg.warmup_steps, span, cfg.lr_scheduler, offset)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, precision, world, trainable_params=sum(p.numel() for p in params)),
        )
        try:
            if plan.keep_optimizer:
                self._restore_optimizer(engine.optimizer, plan.reset_optimizer)
            start_step = run.load_checkpoint(engine) if plan.resume else 0
            earlier = run.truncate_metrics(start_step) if plan.resume and rank == 0 else []
            steps = _Steps(rows, tokenizer.pad_token_id, rank, world, start_step, total_steps, data_offset=offset)
            metrics = _loop(cfg, engine, steps, run, plan.progress, earlier)
            if eval_rows:
                ev = evaluate_engine(engine, eval_rows, tokenizer.pad_token_id, cfg.batch_size)
                metrics.update(ev)
                if rank == 0:
                    run.append({"step": total_steps, "total_steps": total_steps, **ev, "time": time.time()})
            state = gathered_state(engine, peft_model, cfg.zero_stage)
            if plan.keep_optimizer:
                kept = optimizer_memory.capture(engine.optimizer)
                with self._lock:
                    self._optimizer = kept
        finally:
            engine.destroy()
        if bases is not None:
            bases.keep(peft_model, self.model_dir, dtype)
        return FitResult(state=state, num_examples=len(train_records), metrics=metrics)


def fit_adapter(
    cfg: "TrainSettings",
    model_dir: Path,
    data: Records,
    *,
    init_state: StateDict | None = None,
    max_steps: int | None = None,
    prox_mu: float = 0.0,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    eval_data: Records | None = None,
    resume: bool = False,
    schedule_span: tuple[int, int] | None = None,
) -> FitResult:
    """Train a LoRA adapter on `data` and return its state: one `Trainer(cfg, model_dir).fit(TrainPlan(...))`.

    The keywords are `TrainPlan`'s (see there). A process that trains again and again on one model (a silo, a rank
    group) keeps a `Trainer` instead, which keeps the loaded base and the optimizer state between calls.
    """
    plan = TrainPlan(
        data,
        init_state=init_state,
        max_steps=max_steps,
        eval_data=eval_data,
        prox_mu=prox_mu,
        schedule_span=schedule_span,
        run_dir=run_dir,
        progress=progress,
        resume=resume,
    )
    return Trainer(cfg, model_dir).fit(plan)


# ---------------------------------------------------------------- the step loop


@dataclass(frozen=True)
class _Steps:
    """The optimizer steps one call runs and the rows its micro-batches come from."""

    rows: list[datamod.Row]
    pad_id: int
    rank: int
    world: int
    start: int  # the first step to run (a resumed run's checkpoint)
    total: int  # steps in this call
    data_offset: int = 0  # micro-batches start at step data_offset + start (a schedule spanning several calls)


def _loop(
    cfg: "TrainSettings",
    engine: Any,
    steps: _Steps,
    run: RunFolder,
    progress: Progress | None,
    earlier_losses: list[float],
) -> dict[str, float]:
    """Run optimizer steps steps.start..steps.total-1 on micro-batches from step data_offset + start on; returns the
    training metrics."""
    import torch

    engine.train()
    t0 = time.perf_counter()
    tokens_total = 0
    recent: list[float] = earlier_losses[-10:]
    rank, world, total_steps = steps.rank, steps.world, steps.total
    for step in range(steps.start, total_steps):
        step_tokens, ce_sum, ce_n = 0, 0.0, 0
        memory.reset_peak()
        for k in range(cfg.grad_accum):
            index = (steps.data_offset + step) * cfg.grad_accum + k
            mb = datamod.micro_batch(steps.rows, index, cfg.batch_size, cfg.seed, rank, world)
            batch = {key: v.to(engine.device) for key, v in datamod.collate(mb, steps.pad_id, cfg.packing).items()}
            torch.manual_seed(cfg.seed * 1_000_003 + index)  # dropout depends on the step only: exact resume
            loss, s, n = engine(**batch)
            engine.backward(loss)
            engine.step()
            step_tokens += sum(r.num_tokens for r in mb)
            ce_sum += float(s)
            ce_n += int(n)
        if world > 1:  # the step's loss and tokens over the whole global batch, as one rank would report them
            step_tokens, ce_sum, ce_n = sum_over_ranks(step_tokens, ce_sum, ce_n)
        tokens_total += step_tokens
        elapsed = time.perf_counter() - t0
        done = step + 1 - steps.start
        record = {
            "step": step + 1,
            "total_steps": total_steps,
            "loss": ce_sum / max(1, ce_n),
            "lr": engine.get_lr()[0],
            "tokens_per_s": tokens_total / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": elapsed,
            "eta_s": elapsed / done * (total_steps - step - 1),
            "time": time.time(),
            **memory.step_peak(),  # this step's peak resident memory (and GPU memory)
        }
        recent = (recent + [record["loss"]])[-10:]
        if rank == 0:
            run.append(record)
        if run.enabled and ((step + 1) % cfg.checkpoint_every_steps == 0 or step + 1 == total_steps):
            run.save_checkpoint(engine, step + 1)
        if progress is not None and rank == 0:
            progress(record)
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": sum(recent) / len(recent) if recent else float("nan"),
        "steps": float(total_steps),
        "tokens": float(tokens_total),
        "tokens_per_s": tokens_total / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
    }
