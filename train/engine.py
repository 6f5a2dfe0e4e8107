"""The training engine: peft LoRA on a causal LM, driven by DeepSpeed (ZeRO 0-3) in the calling process.

On one CPU machine the engine runs in-process with the gloo backend (the distributed environment variables
are filled in when unset, with a free port). Under the `deepspeed` launcher (`deepspeed --num_gpus N -m fedllm.train
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedllm.core.cores import usable_cores
from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.types import StateDict
from fedllm.train import data as datamod
from fedllm.train import lora

if TYPE_CHECKING:
    import torch

    from fedllm.core.sections.train import TrainSettings

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


@dataclass
class FitResult:
    """What a training (`Trainer.fit`, `fit_adapter`) returns: the new adapter state, how many examples it trained on,
    and metrics."""

    state: StateDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingFailed(ApplianceError):
    """Training stopped with an error (the run folder's status.json says which)."""


# ---------------------------------------------------------------- distributed setup


_SELF_ASSIGNED = (
    "FEDLLM_SELF_ASSIGNED_DIST"  # not APPLIANCE_*: settings and the tests' isolation treat those as configuration
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (bound, then released)."""
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
        os.environ["MASTER_PORT"] = str(free_port())
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


DEEPSPEED_DEFAULT_BUCKET = (
    500_000_000  # elements: DeepSpeed's reduce/allgather bucket default, sized for full fine-tuning
)
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
        raise ConfigError(
            f"train.batch_size={batch_size} (the global micro-batch) must be a multiple of the {world_size} ranks; "
            f"set it to {max(world_size, batch_size // world_size * world_size)} or use fewer ranks"
        )
    return batch_size // world_size


def deepspeed_config(
    cfg: "TrainSettings", precision: str, world_size: int = 1, trainable_params: int | None = None
) -> dict[str, Any]:
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


def loss_module(
    peft_model: Any, prox_ref: StateDict | None, prox_mu: float, zero_stage: int, world_size: int = 1
) -> Any:
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

        def forward(
            self, input_ids: torch.Tensor, labels: torch.Tensor, **kw: Any
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


# ---------------------------------------------------------------- planning a call


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


def prepare_rows(
    cfg: "TrainSettings", tokenizer: Any, records: Sequence[dict[str, Any]], packing: bool | None = None
) -> list[datamod.Row]:
    """Tokenise, then pack (cfg.packing) or keep one example per row."""
    examples = datamod.tokenize_records(tokenizer, records, cfg.max_seq_len)
    use_packing = cfg.packing if packing is None else packing
    return datamod.pack_examples(examples, cfg.max_seq_len) if use_packing else datamod.unpacked_rows(examples)


def sum_over_ranks(*values: float) -> list[Any]:
    """Each value summed over all ranks (one all-reduce); integers stay integers."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [type(v)(x) for v, x in zip(values, t.tolist())]


def evaluate_engine(engine: Any, rows: list[datamod.Row], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over unpacked rows, through the engine (works under ZeRO-3)."""
    import torch

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {
                k: v.to(engine.device) for k, v in datamod.collate(rows[i : i + batch_size], pad_id, False).items()
            }
            _, s, n = engine(**batch)
            total += float(s)
            count += int(n)
    engine.train()
    loss = total / max(1, count)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": float(count)}


def gathered_state(engine: Any, peft_model: Any, zero_stage: int) -> StateDict:
    """The adapter state as CPU float32, gathering ZeRO-3 partitions first."""
    if zero_stage == 3:
        import deepspeed

        params = [p for p in peft_model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return lora.adapter_state(peft_model)
    return lora.adapter_state(peft_model)
