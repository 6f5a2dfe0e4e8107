"""The federation's ZeroMQ messages: a small versioned JSON header plus an optional safetensors payload.

A message on the wire is multipart: frame 0 is the UTF-8 JSON of `Header`, frame 1 (optional) the safetensors
bytes of the tensors the header's `manifest` lists. This module imports only pydantic and the standard library
so the console or an outside silo can speak the protocol without torch; encoding tensors lives in `wire.py`.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a header is metadata only; 1 MiB is far above any real one
MAX_TENSORS = 4096
MAX_NAME_CHARS = 512
MAX_EXAMPLES = 10**12  # far above any silo's data; keeps every weight a finite float
MAX_METRICS = 64
ERROR_CODE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
ALLOWED_DTYPES = frozenset({"float32", "bfloat16", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"})


class MsgType(str, Enum):
    """Every message type of the protocol."""

    HELLO = "HELLO"  # silo -> coordinator: I am here
    WELCOME = "WELCOME"  # coordinator -> silo: run, current round, settings the silo must honour
    TRAIN = "TRAIN"  # coordinator -> silo: the round's task, global adapter in the payload
    UPDATE = "UPDATE"  # silo -> coordinator: the adapter delta in the payload, example count, metrics
    HEARTBEAT = "HEARTBEAT"  # both ways: liveness
    ERROR = "ERROR"  # both ways: what was wrong with a message
    BYE = "BYE"  # both ways: leaving
    SECAGG = "SECAGG"  # both ways: one step of a secure-aggregation round (see SecAggStep)


class TensorSpec(BaseModel):
    """One tensor of the payload: its name, shape and dtype (torch dtype name without `torch.`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    shape: tuple[int, ...]
    dtype: str

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) > 8 or any(d < 0 for d in v):
            raise ValueError(f"tensor shape {v} must have at most 8 non-negative dimensions")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {v!r} is not allowed on the wire (allowed: {sorted(ALLOWED_DTYPES)})")
        return v


# A metric is a finite number (never text: text could carry training data); a name is short.
Metric = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Metrics = Annotated[dict[Annotated[str, Field(max_length=64)], Metric], Field(max_length=MAX_METRICS)]
NumExamples = Annotated[int, Field(ge=1, le=MAX_EXAMPLES, strict=True)]


class Hello(BaseModel):
    """HELLO body (the silo's name comes from its enrolled key): the LoRA rank it trains at, when it says."""

    lora_r: int | None = Field(
        None, ge=1, le=1024, description="The LoRA rank this silo trains at (None: the global rank)."
    )
    lora_alpha: float | None = Field(
        None, gt=0, le=1e6, description="The silo's lora_alpha (its scale is lora_alpha / lora_r)."
    )
    acks_train: bool = Field(
        False,
        description="The silo acknowledges each TRAIN as it arrives (HEARTBEAT got_train): "
        "the coordinator's TRAIN window waits for it (fedllm.federation.runtime.train_window).",
    )


class Welcome(BaseModel):
    """WELCOME body."""

    rounds_total: int = 0
    strategy: str = ""
    heartbeat_interval_s: float = 5.0


class TrainTask(BaseModel):
    """TRAIN body: the round's task. The global adapter travels in the payload."""

    local_steps: int = Field(ge=1)
    config: dict[str, Any] = Field(default_factory=dict, description="Strategy extras, e.g. {'prox_mu': 0.01}.")
    compression: str = "bf16"
    encoding: dict[str, Any] = Field(default_factory=dict, description="How the payload (global adapter) is encoded.")
    dp_clip_norm: float | None = Field(None, description="Set when the silo must clip (and noise) its update.")
    dp_noise_multiplier: float = 0.0
    deadline_unix: float = Field(
        0.0, description="This silo's deadline for the round (coordinator clock, Unix seconds)."
    )
    rounds_total: int = Field(
        0,
        ge=0,
        description="The run's last round (0: not said); a silo that has had that round's "
        "TRAIN and then hears nothing for federation.end_silence_s stops.",
    )
    secure_aggregation: dict[str, Any] | None = Field(
        None,
        description="Set for a secure round: SecAggConfig fields {threshold, clip_range, bits, context}; the silo "
        "answers with SECAGG steps instead of an UPDATE.",
    )


class UpdateResult(BaseModel):
    """UPDATE body: the result of a round's local training; the delta travels in the payload."""

    num_examples: NumExamples
    metrics: Metrics = Field(default_factory=dict)
    encoding: dict[str, Any] = Field(default_factory=dict, description="compression.decode's meta for the payload.")
    train_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    # Timings (docs/CONTRACTS.md, "Per-silo timings"): the silo's own clock, and its estimate of the coordinator's.
    received_at: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Silo clock: when the TRAIN arrived."
    )
    sent_at: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Silo clock: when this UPDATE went to the socket."
    )
    clock_offset_s: float | None = Field(
        None, allow_inf_nan=False, description="Coordinator clock minus silo clock, estimated from HEARTBEAT echoes."
    )
    clock_rtt_s: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Round trip of the echo that estimate came from."
    )


class Advertisement(BaseModel):
    """The data of a secure round's `advertise` step (see SecAggStep): validated like an UPDATE's body."""

    c_pk: str = Field(max_length=256)
    s_pk: str = Field(max_length=256)
    num_examples: NumExamples
    metrics: Metrics = Field(default_factory=dict)
    train_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    update_norm: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="The L2 norm of the silo's update: the round's norm bound is a multiple "
        "of their median (fedllm.federation.aggregation.bounds).",
    )


class ErrorInfo(BaseModel):
    """ERROR body: a machine-readable code (`ERROR_CODES`) and, coordinator -> silo only, a sentence for its log.

    A silo sends the code alone: its exception text (file paths, data) stays in its own log.
    """

    code: str = Field(pattern=ERROR_CODE_PATTERN)
    message: str = Field("", max_length=2000)


# What ERROR codes mean (docs/CONTRACTS.md). Coordinator -> silo: why a message was refused; silo -> coordinator:
# why it has no update this round.
ERROR_CODES = {
    "malformed": "the message or its payload is not valid",
    "bad_metrics": "metrics that are not finite numbers, or too many of them",
    "manifest": "tensor names differ from the global adapter",
    "bad_shape": "a tensor's shape differs from the global adapter's",
    "bad_dtype": "a tensor that is not floating point",
    "non_finite": "NaN or infinite values",
    "norm": "the update's L2 norm exceeds federation.max_update_norm",
    "oversized": "the payload exceeds the bound for this adapter",
    "not_selected": "the silo was not selected for this round",
    "duplicate": "the silo already answered this round (the first answer stands)",
    "late": "the round's deadline passed",
    "stale_round": "the message is for another round",
    "not_enrolled": "the sender's key is not (or no longer) enrolled",
    "unknown_silo": "a message without a silo id",
    "unexpected": "a message type this side does not accept",
    "secagg": "a secure-aggregation step that is out of order or malformed",
    "internal": "the coordinator failed to handle the message",
    "train_failed": "the silo's local training failed",
    "secagg_failed": "the silo could not complete a secure-aggregation step",
    "silo_failure": "the silo failed to handle a message",
    "unreachable": "the coordinator could not send the silo its task",
    "silo_error": "the silo reported a code this coordinator does not know",
    "silo_policy": (
        "the silo's own policy refused the task (it requires DP or secure aggregation the TRAIN did not ask for)"
    ),
}


class Heartbeat(BaseModel):
    """HEARTBEAT body. Silo -> coordinator: `sent_at` (silo clock); the coordinator answers each with a HEARTBEAT of
    `echo` (that `sent_at`) and `sent_at` (its clock), so a silo knows the coordinator is alive and can estimate the
    offset between the two clocks (`fedllm.federation.runtime.timing.ClockOffset`). Both fields are optional (liveness
    only)."""

    sent_at: float | None = Field(None, ge=0, allow_inf_nan=False)
    echo: float | None = Field(None, ge=0, allow_inf_nan=False)
    got_train: int | None = Field(
        None,
        ge=0,
        description="Silo: the round whose TRAIN just arrived (frees its place in "
        "the coordinator's TRAIN window, fedllm.federation.runtime.train_window).",
    )


class Bye(BaseModel):
    """BYE body."""

    reason: str = ""


class SecAggStep(BaseModel):
    """SECAGG body: one step of a secure round (federation/aggregation/secure_round.py), JSON only.

    silo -> coordinator: `advertise` {c_pk, s_pk, num_examples, metrics, train_s}, `share_keys` {ciphertexts},
    `masked` {} with the masked vector as the payload (one tensor `masked`, int32 or int64 holding the uint32/uint64
    words), `unmask` {shares}. coordinator -> silo: `roster` {roster, total_examples}, `shares` {ciphertexts},
    `survivors` {survivors}.
    """

    model_config = ConfigDict(extra="forbid")

    step: Literal["advertise", "roster", "share_keys", "shares", "masked", "survivors", "unmask"]
    data: dict[str, Any] = Field(default_factory=dict)


BODY_TYPES: dict[MsgType, type[BaseModel]] = {
    MsgType.HELLO: Hello,
    MsgType.WELCOME: Welcome,
    MsgType.TRAIN: TrainTask,
    MsgType.UPDATE: UpdateResult,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.ERROR: ErrorInfo,
    MsgType.BYE: Bye,
    MsgType.SECAGG: SecAggStep,
}


class Header(BaseModel):
    """Frame 0 of every message."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = PROTOCOL_VERSION
    type: MsgType
    run: str = Field("", max_length=128)
    round_id: int = Field(-1, ge=-1)
    silo_id: str = Field("", max_length=128)
    manifest: list[TensorSpec] = Field(default_factory=list, max_length=MAX_TENSORS)
    payload_bytes: int = Field(0, ge=0)
    body: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "Header":
        if self.schema_version != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {self.schema_version} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        names = [t.name for t in self.manifest]
        if len(set(names)) != len(names):
            raise ValueError("manifest lists a tensor name twice")
        BODY_TYPES[self.type].model_validate(self.body)
        return self


class HeaderError(ValueError):
    """A header frame that is not valid JSON or not a valid `Header`."""


def make_header(type_: MsgType, body: BaseModel | None = None, **fields: Any) -> Header:
    """A header of `type_` with `body` (its typed model) and the common fields."""
    return Header(type=type_, body=body.model_dump(mode="json") if body is not None else {}, **fields)


def dump_header(header: Header) -> bytes:
    """The header's JSON bytes (frame 0)."""
    return header.model_dump_json().encode("utf-8")


def load_header(data: bytes) -> Header:
    """Parse and validate frame 0.

    Raises:
        HeaderError: oversized, not JSON, or not a valid header (the message says which).
    """
    if len(data) > MAX_HEADER_BYTES:
        raise HeaderError(f"header of {len(data)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not UTF-8 JSON: {exc}") from exc
    try:
        return Header.model_validate(raw)
    except ValidationError as exc:
        raise HeaderError(f"invalid header: {exc.errors(include_url=False)}") from exc
