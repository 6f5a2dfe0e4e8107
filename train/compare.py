"""Side-by-side evaluation: the base model and registered adapters scored on the same data, as one table.

A target is `base` (the base model, no adapter) or a registered adapter `NAME[:VERSION]`. `base` means the base
model of the adapters being compared (or, with none, the model named by the caller or settings.model), so
"is my adapter better than the base model?" is answered on equal terms: same data, same tokenisation, same
generation budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.adapter_registry import AdapterRegistry, AdapterVersion
from fedllm.core.atomic import write_json_atomic
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import resolve_model
from fedllm.train.runs import adapter_base_dir, adapter_train_settings

if TYPE_CHECKING:
    from fedllm.core.sections.train import TrainSettings
    from fedllm.core.settings import ApplianceSettings

BASE = "base"
COLUMNS = ("eval_loss", "perplexity", "exact_match", "token_f1", "tokens")


@dataclass(frozen=True)
class EvalTarget:
    """One model to score: a label for the table, its train settings, base model folder and adapter (None = base)."""

    label: str
    cfg: "TrainSettings"
    model_dir: Path
    adapter: AdapterVersion | None


def parse_targets(spec: str) -> list[str]:
    """`base,NAME[:V],...` as a list of targets (blank items dropped, order kept).

    Raises:
        ConfigError: the list is empty or names a target twice.
    """
    refs = [s.strip() for s in spec.split(",") if s.strip()]
    if not refs:
        raise ConfigError("--compare needs at least one target: base or NAME[:VERSION], comma-separated")
    if len(set(refs)) != len(refs):
        raise ConfigError(f"--compare names a target twice: {spec!r}")
    return refs


def resolve_targets(settings: "ApplianceSettings", refs: Sequence[str], model: str | None = None) -> list[EvalTarget]:
    """The targets for `refs`; `base` is the adapters' common base model (else `model`, else settings.model).

    Raises:
        ModelNotFound: an unknown adapter or model. ConfigError: the adapters do not share one base model.
    """
    registry = AdapterRegistry(settings.adapters_dir)
    adapters = {ref: _adapter_target(settings, registry.get(ref)) for ref in refs if ref != BASE}
    bases = {t.model_dir.resolve() for t in adapters.values()}
    if len(bases) > 1:
        raise ConfigError(
            f"the adapters have different base models ({', '.join(sorted(map(str, bases)))}); "
            "compare adapters of one base model at a time"
        )
    if model is not None:
        base_dir = resolve_model(settings.models_dir, model)
        if bases and base_dir.resolve() not in bases:
            raise ConfigError(f"--model {model} is not the base model of the adapters compared ({bases.pop()})")
    elif adapters:
        base_dir = next(iter(adapters.values())).model_dir
    else:
        base_dir = resolve_model(settings.models_dir, settings.model)
    base = EvalTarget(BASE, settings.train, base_dir, None)
    return [base if ref == BASE else adapters[ref] for ref in refs]


def _adapter_target(settings: "ApplianceSettings", av: AdapterVersion) -> EvalTarget:
    return EvalTarget(av.ref, adapter_train_settings(settings, av), adapter_base_dir(settings, av), av)


def default_data(targets: Sequence[EvalTarget]) -> Path | None:
    """The training data named in the first adapter's meta (what `appliance eval` scores without --data)."""
    for t in targets:
        if t.adapter is not None and t.adapter.meta.get("data"):
            return Path(t.adapter.meta["data"])
    return None


def evaluate_targets(
    targets: Sequence[EvalTarget],
    data: Path | Sequence[dict[str, Any]],
    *,
    generate: bool = True,
    max_new_tokens: int = 64,
    max_generate: int = 50,
    on_row: Callable[[list[tuple[str, dict[str, float]]]], None] | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """Score each target on the same data with `train.evaluate_adapter`; returns (label, metrics) in order.

    `on_row(rows_so_far)` is called after each target is scored (progress for a caller that shows it)."""
    from fedllm.train import evaluate_adapter, load_adapter_state

    rows: list[tuple[str, dict[str, float]]] = []
    for t in targets:
        state = load_adapter_state(t.adapter.path) if t.adapter is not None else None
        rows.append(
            (
                t.label,
                evaluate_adapter(
                    t.cfg,
                    t.model_dir,
                    state,
                    data,
                    generate=generate,
                    max_new_tokens=max_new_tokens,
                    max_generate=max_generate,
                ),
            )
        )
        if on_row is not None:
            on_row(list(rows))
    return rows


def write_report(
    path: Path, refs: Sequence[str], data: Path | str, rows: Sequence[tuple[str, dict[str, float]]]
) -> None:
    """Write (atomically) the comparison as JSON, as `appliance eval --json-out` does before the first model and after
    each: `{"targets": [...], "data", "done", "total", "rows": [{"model", "metrics"}]}`."""
    write_json_atomic(
        Path(path),
        {
            "targets": list(refs),
            "data": str(data),
            "done": len(rows),
            "total": len(refs),
            "rows": [{"model": label, "metrics": m} for label, m in rows],
        },
    )


def format_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """A plain-text table, one row per model, columns from COLUMNS that any row has ('-' where missing)."""
    columns = [c for c in COLUMNS if any(c in m for _, m in rows)]
    header = ["model", *columns]
    body = [[label, *(_cell(m.get(c)) for c in columns)] for label, m in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
