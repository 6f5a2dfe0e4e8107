"""The training engine: peft LoRA on a causal LM, driven by DeepSpeed (ZeRO 0-3) in the calling process.

On one CPU machine the engine runs in-process with the gloo backend (the distributed environment variables
are filled in when unset, with a free port). Under the `deepspeed` launcher (`deepspeed --num_gpus N -m train
--data ...`) the same code runs one process per GPU: the launcher sets RANK/WORLD_SIZE/LOCAL_RANK, each rank
takes its own micro-batches, and rank 0 writes the run folder.

A step is a pure function of (seed, step): the micro-batches come from `data.micro_batch(index)` and the
dropout RNG is re-seeded per micro-batch, so resuming from a checkpoint replays exactly what an uninterrupted
run would have done.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.cores import usable_cores
from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.types import StateDict
from train import data as datamod
from train import lora, memory, optimizer_memory
from train.run_folder import RunFolder, run_config

if TYPE_CHECKING:
    import torch
    from appliance.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    """What `fit_adapter` returns: the new adapter state, how many examples it trained on, and metrics."""

    state: StateDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingFailed(ApplianceError):
    """Training stopped with an error (the run folder's status.json says which)."""


# ---------------------------------------------------------------- distributed setup


_SELF_ASSIGNED = "FEDLLM_SELF_ASSIGNED_DIST"  # not APPLIANCE_*: settings and the tests' isolation treat those as configuration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed once per process: gloo on CPU, nccl under the launcher on GPUs.

    A single process gets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT
    when they are unset.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    # A process that set these variables for itself passes them on to every child it starts (an `appliance train`
    # subprocess, a console, a test's CLI run); a child must not reuse the parent's MASTER_PORT, which the parent's
    # store still holds. The marker tells a self-assigned setup from one made by the `deepspeed` launcher.
    if "MASTER_PORT" not in os.environ or os.environ.get(_SELF_ASSIGNED) == "1":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ[_SELF_ASSIGNED] = "1"
    if _use_cuda():
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        deepspeed.init_distributed(dist_backend="gloo")


def set_threads(threads: int | None) -> int:
    """Size torch's intra-op (OpenMP) thread pool: `threads`, else the cores this process may run on.

    `os.sched_getaffinity` gives the cores a process is pinned to (by `taskset`, a container's cpuset, or a
    parent that divides the machine among several silos), so the default never oversubscribes them; ranks that
    DeepSpeed's launcher started on one node (LOCAL_SIZE of them) share those cores. Returns the number set.
    """
    import torch

    local_ranks = int(os.environ.get("LOCAL_SIZE", "1")) if os.environ.get(_SELF_ASSIGNED) != "1" else 1
    n = threads if threads is not None else max(1, usable_cores() // max(1, local_ranks))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_precision(precision: str) -> str:
    """'fp32', 'bf16' or 'fp16': auto means bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision != "auto":
        if precision != "fp32" and not torch.cuda.is_available():
            raise ConfigError(f"train.precision={precision} needs a CUDA GPU; use fp32 (or auto) on the CPU")
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's reduce/allgather bucket default, sized for full fine-tuning
MIN_BUCKET = 1 << 20  # elements (4 MiB in fp32): below this, more collectives for no memory worth saving


def bucket_elements(trainable_params: int) -> int:
    """Elements per ZeRO gradient bucket for a model with `trainable_params` trainable parameters.

    DeepSpeed allocates its reduce bucket up front (stage 2 keeps one or two flat buffers of `reduce_bucket_size`
    elements; 5e8 fp32 elements are 2 GB each) although a LoRA of under a million parameters fills a
    thousandth of it. One bucket holding every trainable parameter reduces them in one collective; the size is
    clamped to [MIN_BUCKET, DeepSpeed's default] so full fine-tuning keeps DeepSpeed's own choice.
    """
    if trainable_params < 1:
        raise ConfigError(f"nothing to train: {trainable_params} trainable parameters")
    return max(MIN_BUCKET, min(DEEPSPEED_DEFAULT_BUCKET, int(trainable_params)))


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Sequences each rank takes of every global micro-batch of `batch_size` (which the ranks split evenly).

    Raises:
        ConfigError: the batch does not split evenly across the ranks.
    """
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} (the global micro-batch) must be a multiple of the {world_size} ranks; "
                          f"set it to {max(world_size, batch_size // world_size * world_size)} or use fewer ranks")
    return batch_size // world_size


def deepspeed_config(cfg: "TrainSettings", precision: str, world_size: int = 1, trainable_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for these settings (optimizer and schedule are passed as objects).

    `cfg.batch_size` is the global micro-batch: each of the `world_size` ranks takes its share. With
    `trainable_params`, the gradient buckets are sized from it (`bucket_elements`); else DeepSpeed's defaults.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if trainable_params is not None:
        bucket = bucket_elements(trainable_params)
        zero["reduce_bucket_size"] = bucket
        if cfg.zero_stage in (1, 2):
            zero["allgather_bucket_size"] = bucket
        # stage 3's prefetch/live-parameter limits concern fetching the (frozen) base weights: left to DeepSpeed.
    if cfg.offload_optimizer and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _use_cuda()}
    if cfg.offload_param:
        if cfg.zero_stage != 3:
            raise ConfigError("train.offload_param needs zero_stage=3 (ZeRO-Infinity parameter offload)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": _use_cuda()}
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch(cfg.batch_size, world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # a plain torch AdamW over the LoRA weights: works under every stage, on CPU and GPU alike
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


LR_SCHEDULERS = ("cosine", "linear", "constant")


def lr_lambda(warmup_steps: int, total_steps: int, kind: str = "cosine", offset: int = 0) -> Callable[[int], float]:
    """The LR multiplier at each step of this call: linear warmup from 0 to 1 over `warmup_steps`, then `kind`.

    `kind` is cosine (decay to 0 at `total_steps`), linear (decay to 0) or constant (stay at 1). `offset` shifts the
    call's steps into a longer schedule: step s of this call is step `offset + s` of a schedule of `total_steps`
    (a federation drives one schedule across its rounds this way).
    """
    if kind not in LR_SCHEDULERS:
        raise ConfigError(f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {kind!r}")

    def f(call_step: int) -> float:
        step = offset + call_step
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------- the loss module


def _loss_module(peft_model: Any, prox_ref: StateDict | None, prox_mu: float, zero_stage: int, world_size: int = 1) -> Any:
    """Wrap a peft model so forward returns (loss, ce_sum, label_tokens) with the optional proximal term.

    On several ranks each rank's cross-entropy is weighted by its share of the global micro-batch's label tokens
    (times `world_size`, which DeepSpeed's gradient averaging divides out), so the gradient is that of the mean
    over the whole global batch, as on one rank, however the tokens fall across ranks.
    """
    import torch

    class LossModule(torch.nn.Module):
        """forward(batch) -> (mean CE + (mu/2)*||w - w_ref||^2, CE summed over label tokens, label tokens)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = peft_model
            self.prox_pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
            if prox_ref is not None and prox_mu > 0:
                named = dict(_named_lora_params(peft_model))
                self.prox_pairs = [(named[k], prox_ref[k].detach().clone()) for k in sorted(named)]
                if zero_stage == 3:
                    import deepspeed

                    for p, _ in self.prox_pairs:  # gathered for our whole forward, not only their layer's
                        deepspeed.zero.register_external_parameter(self, p)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.model(input_ids=input_ids, labels=labels, use_cache=False, **kw)
            n = (labels[:, 1:] != datamod.IGNORE_INDEX).sum()
            loss = out.loss
            if world_size > 1:
                import torch.distributed as dist

                n_global = n.detach().clone()
                dist.all_reduce(n_global)
                loss = loss * (n * world_size / n_global.clamp(min=1))
            if self.prox_pairs:
                prox = sum(((p - ref.to(p.device, p.dtype)) ** 2).sum() for p, ref in self.prox_pairs)
                loss = loss + 0.5 * prox_mu * prox
            return loss, out.loss.detach() * n, n

    return LossModule()


def _named_lora_params(peft_model: Any) -> list[tuple[str, Any]]:
    """(state-dict key, parameter) of every trainable LoRA weight, keys as in get_peft_model_state_dict."""
    out = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            out.append((name.replace(".default", ""), p))
    return out


# ---------------------------------------------------------------- the public entry point


def plan_steps(cfg: "TrainSettings", num_rows: int, max_steps: int | None) -> int:
    """Optimizer steps to run: the explicit `max_steps`, else cfg.epochs over the rows, else cfg.max_steps."""
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        return max_steps
    if cfg.epochs is not None:
        per_epoch = datamod.batches_per_epoch(num_rows, cfg.batch_size)
        return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    return cfg.max_steps


def prepare_rows(cfg: "TrainSettings", tokenizer: Any, records: Sequence[dict[str, Any]], packing: bool | None = None) -> list[datamod.Row]:
    """Tokenise, then pack (cfg.packing) or keep one example per row."""
    examples = datamod.tokenize_records(tokenizer, records, cfg.max_seq_len)
    use_packing = cfg.packing if packing is None else packing
    return datamod.pack_examples(examples, cfg.max_seq_len) if use_packing else datamod.unpacked_rows(examples)


def fit_adapter(
    cfg: "TrainSettings",
    model_dir: Path,
    data: Path | Sequence[dict[str, Any]],
    *,
    init_state: StateDict | None = None,
    max_steps: int | None = None,
    prox_mu: float = 0.0,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    eval_data: Path | Sequence[dict[str, Any]] | None = None,
    resume: bool = False,
    schedule_span: tuple[int, int] | None = None,
    reuse_base: bool = False,
    optimizer_slot: str | None = None,
    reset_optimizer: bool = False,
) -> FitResult:
    """Train a LoRA adapter on `data` and return its state.

    Args:
        cfg: the train settings section.
        model_dir: an HF model folder (the base model).
        data: a JSONL path or records in any supported format.
        init_state: adapter weights to start from (default: a fresh LoRA seeded by cfg.seed).
        max_steps: optimizer steps; overrides cfg.epochs / cfg.max_steps.
        prox_mu: FedProx: adds (mu/2)*||w - init_state||^2 over the LoRA weights (needs init_state, else the
            fresh initial state is the reference).
        run_dir: where config.json, status.json, metrics.jsonl, train.log and checkpoints/ go; None writes nothing.
        progress: called after every optimizer step with the metrics.jsonl record.
        eval_data: held-out records; else cfg.eval_fraction of `data` is held out. Evaluated at the end.
        resume: continue from the latest checkpoint in run_dir/checkpoints (exactly, same steps and batches).
        schedule_span: `(offset, total)`: this call's steps are steps offset.. of one run of `total` steps that spans
            several calls, such as a federation's rounds: of its LR schedule (warmup then cfg.lr_scheduler) and of
            its pass over the data (micro-batches continue from batch offset, so consecutive calls see consecutive
            batches rather than the first ones again). None: both start afresh at this call's first step.
        reuse_base: keep the loaded base model in this process for the next call with the same model folder
            (a silo's or a rank group's rounds), instead of loading it from disk each time; ZeRO-3 always loads.
        optimizer_slot: a name under which this process keeps the optimizer's state (AdamW moments and step count)
            between calls: the call starts from what the previous call with this slot left, when it fits (same
            trainable shapes, ZeRO stage and ranks; else it starts fresh and logs why), and leaves its own state
            there. A silo's rounds continue one optimizer this way, as one long run would. None: a fresh optimizer.
        reset_optimizer: drop what `optimizer_slot` holds first (a federation's first round).

    Returns:
        FitResult(state, num_examples, metrics) with train_loss (mean of the last steps), steps, tokens,
        tokens_per_s, elapsed_s and eval_loss/perplexity when there is eval data.

    Raises:
        DataError: invalid data (all problems listed). ConfigError: settings that cannot work.
        TrainingFailed: anything failing during training (status.json records it).
    """
    records = datamod.load_data(data)
    if eval_data is not None:
        train_records, eval_records = records, datamod.load_data(eval_data)
    else:
        train_records, eval_records = datamod.split_eval(records, cfg.eval_fraction, cfg.seed)
    run = RunFolder(run_dir)
    run.start(run_config(cfg, model_dir, data, eval_data=eval_data, max_steps=max_steps))
    handler = run.attach_log()
    try:
        result = _train(cfg, Path(model_dir), train_records, eval_records, init_state, max_steps, prox_mu, run, progress, resume,
                        schedule_span, reuse_base, optimizer_slot, reset_optimizer)
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


def _train(
    cfg: "TrainSettings",
    model_dir: Path,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]],
    init_state: StateDict | None,
    max_steps: int | None,
    prox_mu: float,
    run: RunFolder,
    progress: Progress | None,
    resume: bool,
    schedule_span: tuple[int, int] | None = None,
    reuse_base: bool = False,
    optimizer_slot: str | None = None,
    reset_optimizer: bool = False,
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

    tokenizer = lora.load_tokenizer(model_dir)
    rows = prepare_rows(cfg, tokenizer, train_records)
    eval_rows = datamod.unpacked_rows(datamod.tokenize_records(tokenizer, eval_records, cfg.max_seq_len)) if eval_records else []
    total_steps = plan_steps(cfg, len(rows), max_steps)

    reuse_base = reuse_base and cfg.zero_stage < 3  # ZeRO-3 partitions the base weights: never kept
    base = lora.take_base_model(model_dir, dtype) if reuse_base else None
    peft_model = lora.build_peft_model(cfg, model_dir, dtype, init_state, base=base)
    lora.set_gradient_checkpointing(peft_model, cfg.gradient_checkpointing)
    if cfg.lora_freeze_a:
        lora.freeze_lora_a(peft_model)
    ref = init_state if init_state is not None else (lora.adapter_state(peft_model) if prox_mu > 0 else None)
    module = _loss_module(peft_model, ref, prox_mu, cfg.zero_stage, world)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    offset, span = schedule_span if schedule_span is not None else (0, total_steps)
    if offset < 0 or span < offset + 1:
        raise ConfigError(f"schedule_span {schedule_span} must be (offset >= 0, total > offset)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, span, cfg.lr_scheduler, offset))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision, world, trainable_params=sum(p.numel() for p in params))
    )
    try:
        if optimizer_slot is not None:
            optimizer_memory.restore(optimizer_slot, engine.optimizer, reset=reset_optimizer)
        start_step = run.load_checkpoint(engine) if resume else 0
        earlier = run.truncate_metrics(start_step) if resume and rank == 0 else []
        metrics = _loop(cfg, engine, rows, tokenizer.pad_token_id, cfg.packing, start_step, total_steps, rank, world, run, progress,
                        earlier, data_offset=offset)
        if eval_rows:
            ev = _evaluate_engine(engine, eval_rows, tokenizer.pad_token_id, cfg.batch_size)
            metrics.update(ev)
            if rank == 0:
                run.append({"step": total_steps, "total_steps": total_steps, **ev, "time": time.time()})
        state = _gathered_state(engine, peft_model, cfg.zero_stage)
        if optimizer_slot is not None:
            optimizer_memory.keep(optimizer_slot, engine.optimizer)
    finally:
        engine.destroy()
    if reuse_base:
        lora.keep_base_model(peft_model, model_dir, dtype)
    return FitResult(state=state, num_examples=len(train_records), metrics=metrics)


def _loop(
    cfg: "TrainSettings",
    engine: Any,
    rows: list[datamod.Row],
    pad_id: int,
    packed: bool,
    start_step: int,
    total_steps: int,
    rank: int,
    world: int,
    run: RunFolder,
    progress: Progress | None,
    earlier_losses: list[float],
    data_offset: int = 0,
) -> dict[str, float]:
    """Run optimizer steps start_step..total_steps-1 on micro-batches from step data_offset + start_step on; returns the
    training metrics."""
    import torch

    engine.train()
    t0 = time.perf_counter()
    tokens_total = 0
    recent: list[float] = earlier_losses[-10:]
    for step in range(start_step, total_steps):
        step_tokens, ce_sum, ce_n = 0, 0.0, 0
        memory.reset_peak()
        for k in range(cfg.grad_accum):
            index = (data_offset + step) * cfg.grad_accum + k
            mb = datamod.micro_batch(rows, index, cfg.batch_size, cfg.seed, rank, world)
            batch = {key: v.to(engine.device) for key, v in datamod.collate(mb, pad_id, packed).items()}
            torch.manual_seed(cfg.seed * 1_000_003 + index)  # dropout depends on the step only: exact resume
            loss, s, n = engine(**batch)
            engine.backward(loss)
            engine.step()
            step_tokens += sum(r.num_tokens for r in mb)
            ce_sum += float(s)
            ce_n += int(n)
        if world > 1:  # the step's loss and tokens over the whole global batch, as one rank would report them
            step_tokens, ce_sum, ce_n = _sum_over_ranks(step_tokens, ce_sum, ce_n)
        tokens_total += step_tokens
        elapsed = time.perf_counter() - t0
        done = step + 1 - start_step
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


def _sum_over_ranks(*values: float) -> list[Any]:
    """Each value summed over all ranks (one all-reduce); integers stay integers."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [type(v)(x) for v, x in zip(values, t.tolist())]


def _evaluate_engine(engine: Any, rows: list[datamod.Row], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over unpacked rows, through the engine (works under ZeRO-3)."""
    import torch

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(engine.device) for k, v in datamod.collate(rows[i : i + batch_size], pad_id, False).items()}
            _, s, n = engine(**batch)
            total += float(s)
            count += int(n)
    engine.train()
    loss = total / max(1, count)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(count)}


def _gathered_state(engine: Any, peft_model: Any, zero_stage: int) -> StateDict:
    """The adapter state as CPU float32, gathering ZeRO-3 partitions first."""
    if zero_stage == 3:
        import deepspeed

        params = [p for p in peft_model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return lora.adapter_state(peft_model)
    return lora.adapter_state(peft_model)
