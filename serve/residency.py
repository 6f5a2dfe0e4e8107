"""Data residency: an adapter whose publication names regions is placed and routed only on trusted workers the
operator put in one of them.

A worker's region counts only when the operator assigned it: a static worker's `serve.workers[].region` (local
workers: `worker.region`), or a joined worker's region confirmed with `POST /admin/workers/{id}/region` (`appliance
fleet region ID REGION`). A joined worker's own `region` claim is shown, never trusted. When no allowed worker is up,
a request for the adapter answers 503 naming the adapter and its regions: it never falls back to another region.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from fedllm.core.atomic import write_json_atomic
from fedllm.serve.errors import RouterError

if TYPE_CHECKING:
    from fedllm.serve.registry import Worker

logger = logging.getLogger(__name__)

MAX_REGIONS = 32
_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_region(region: str, param: str = "region") -> str:
    """`region` stripped, if it is a region label (letters, digits, `_ . -`, at most 64, starting with a letter or
    digit).

    Raises:
        RouterError: 400 naming the bad label.
    """
    label = region.strip() if isinstance(region, str) else ""
    if not _REGION.match(label):
        raise RouterError(
            400,
            f"{region!r} is not a region label: use letters, digits, '_', '.' or '-' "
            "(at most 64, starting with a letter or digit), e.g. eu-west",
            param=param,
        )
    return label


def check_regions(regions: Iterable[str] | None) -> list[str] | None:
    """The allowed regions of a publication, de-duplicated in their order; None (anywhere) for none or an empty list.

    Raises:
        RouterError: 400 a bad label, or more than MAX_REGIONS.
    """
    if regions is None:
        return None
    out: list[str] = []
    for region in regions:
        label = check_region(region, "regions")
        if label not in out:
            out.append(label)
    if len(out) > MAX_REGIONS:
        raise RouterError(400, f"{len(out)} regions given; a publication names at most {MAX_REGIONS}", param="regions")
    return out or None


def allowed(worker: Worker, regions: list[str] | None) -> bool:
    """Whether `worker` may hold an adapter limited to `regions`: always without a limit, else only in a region the
    operator assigned it."""
    return regions is None or (worker.region_assigned and worker.region in regions)


def unavailable(name: str, regions: list[str], asked: str | None = None) -> RouterError:
    """The 503 of a request for adapter `name` (asked for as `asked`, e.g. its alias) when no worker of its regions is
    up."""
    via = f" (behind {asked!r})" if asked and asked != name else ""
    return RouterError(
        503,
        f"adapter {name!r}{via} may be served only in region(s) {', '.join(regions)} (its data residency) "
        "and no trusted worker there is up now; it is never served from another region. "
        "Check `appliance fleet` (a joined worker's region counts once `appliance fleet region ID REGION` "
        "confirmed it)",
        retry_after_s=5.0,
    )


def no_eligible_worker(name: str, regions: list[str], base_model: str | None, fleet: list[Worker]) -> RouterError:
    """The 409 of a publish limited to `regions` that no worker of the fleet could ever hold."""
    seen = sorted({f"{w.region}{'' if w.region_assigned else ' (claimed, unconfirmed)'}" for w in fleet}) or ["none"]
    base = f" serving base model {base_model!r}" if base_model else ""
    return RouterError(
        409,
        f"cannot publish {name!r} limited to region(s) {', '.join(regions)}: no trusted worker{base} "
        f"has an operator-assigned region among them (worker regions now: {', '.join(seen)}); "
        "add one (serve.workers[].region, worker.region) or confirm a joined worker's region with "
        "`appliance fleet region ID REGION` (joined workers hold adapters only with "
        "serve.place_adapters_on_joined: true)",
        param="regions",
    )


class RegionBook:
    """The operator's region assignments of joined workers, by normalised `host:port`, kept in
    `HOME/router/worker_regions.json` (`{address: region}`, written atomically), so that a worker joining again, also
    after a router restart, is in the region the operator put it in (in memory only when `path` is None).

    A worker that cannot be read back from the file is not assigned (safe side: its adapters limited to regions are
    not placed there); the file's problem is logged with its path.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.regions: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self.regions = {str(k): check_region(v) for k, v in data.items()}
            except (OSError, ValueError, RouterError) as exc:
                logger.error(
                    "cannot read the operator's worker regions %s (%s); joined workers start unassigned", path, exc
                )

    def lookup(self, address: str) -> str | None:
        """The region the operator assigned to the worker at `address`, if any."""
        return self.regions.get(address)

    def assign(self, address: str, region: str) -> None:
        """Record that the worker at `address` is in `region` (the operator's word)."""
        if not address:
            return
        self.regions[address] = region
        if self.path is not None:
            write_json_atomic(self.path, self.regions)
