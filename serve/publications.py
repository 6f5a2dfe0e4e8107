"""Published adapters that survive a router restart, and the history of every alias move (rollback goes back in it).

The router keeps its publications (`fedllm.serve.placement.AdapterPlacement`) in memory; this store writes them to
`HOME/router/publications.json` (atomically) after each change and reads them back at start, so after a restart each
adapter answers again under its name and its aliases without a new publish (loaded on workers as they come up).

The file: `{"adapters": {name: {path, base_model, version, seq, fingerprint, regions}}, "aliases": {alias: name},
"history": {alias: [{name, version, from, at, by, reason}]}, "seq": N}`. `version` is the registry version a publish
named (compared so that a slower, older publish never moves an alias back); `seq` numbers publishes in the order they
began (compared when a version is missing). `fingerprint` sums the adapter folder's file names, sizes and
modification times, so publishing a name again after its files changed reloads it on the workers. `regions` is the
publication's data residency (serve/residency.py; null: anywhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.atomic import write_json_atomic
from fedllm.serve.errors import RouterError

if TYPE_CHECKING:
    from fedllm.serve.placement import AdapterPlacement, PublishedAdapter

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 200  # moves kept per alias (the oldest are dropped)


def fingerprint(path: str) -> str | None:
    """A digest of the file names, sizes and modification times under `path`; None when this process cannot read
    it (a folder only the workers see)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    try:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = f.stat()
            digest.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return digest.hexdigest()[:16]


def newer(a: PublishedAdapter, b: PublishedAdapter) -> bool:
    """Whether `a` is a newer publication than `b` (so an alias on `b` may move to `a`): registry versions when both
    have one, else the order their publishes began."""
    if a.version is not None and b.version is not None and a.version != b.version:
        return a.version > b.version
    return a.seq >= b.seq


class PublicationStore:
    """The persisted publications and alias history (in memory only when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.seq = 0

    def next_seq(self) -> int:
        """A number for a publish that begins now (larger than every earlier one, restarts included)."""
        self.seq += 1
        return self.seq

    def load(self) -> dict[str, Any]:
        """The saved state (empty when there is none).

        Raises:
            RouterError: the file exists but is not a publications file (names it; fix or remove it).
        """
        if self.path is None or not self.path.exists():
            return {"adapters": {}, "aliases": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data.get("adapters"), dict) or not isinstance(data.get("aliases"), dict):
                raise ValueError("needs 'adapters' and 'aliases' objects")
        except (OSError, ValueError, AttributeError) as exc:
            raise RouterError(
                500, f"cannot read the router's publications {self.path}: {exc}; fix or remove the file"
            ) from exc
        self.history = {k: list(v) for k, v in (data.get("history") or {}).items()}
        self.seq = int(data.get("seq") or 0)
        return data

    def restore(self, placement: AdapterPlacement) -> list[str]:
        """Put the saved adapters and aliases back into `placement`; returns the adapter names restored."""
        from fedllm.serve.placement import PublishedAdapter

        data = self.load()
        for name, row in data["adapters"].items():
            placement.published[name] = PublishedAdapter(
                name,
                row["path"],
                [],
                row.get("base_model"),
                version=row.get("version"),
                seq=int(row.get("seq") or 0),
                fingerprint=row.get("fingerprint"),
                regions=list(row["regions"]) if row.get("regions") else None,
            )
        for alias, name in data["aliases"].items():
            if name in placement.published:
                placement.aliases[alias] = name
                placement.published[name].aliases.append(alias)
        if placement.published:
            logger.info(
                "restored %d published adapter(s) and %d alias(es) from %s",
                len(placement.published),
                len(placement.aliases),
                self.path,
            )
        return list(placement.published)

    def save(self, placement: AdapterPlacement) -> None:
        """Write the current publications (after every publish, unpublish or alias move)."""
        if self.path is None:
            return
        adapters = {
            a.name: {
                "path": a.path,
                "base_model": a.base_model,
                "version": a.version,
                "seq": a.seq,
                "fingerprint": a.fingerprint,
                "regions": a.regions,
            }
            for a in placement.published.values()
        }
        write_json_atomic(
            self.path,
            {"adapters": adapters, "aliases": dict(placement.aliases), "history": self.history, "seq": self.seq},
        )

    def moved(self, alias: str, adapter: PublishedAdapter, previous: str | None, by: str, reason: str) -> None:
        """Record that `alias` now names `adapter` (from `previous`)."""
        rows = self.history.setdefault(alias, [])
        rows.append(
            {
                "name": adapter.name,
                "version": adapter.version,
                "from": previous,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "by": by,
                "reason": reason,
            }
        )
        del rows[:-HISTORY_LIMIT]

    def held_back(
        self, alias: str, adapter: PublishedAdapter, current: str | None, by: str, gate: dict[str, Any]
    ) -> None:
        """Record that a promotion gate kept `alias` off `adapter` (on `current`), with the two losses."""
        rows = self.history.setdefault(alias, [])
        rows.append(
            {
                "name": adapter.name,
                "version": adapter.version,
                "from": current,
                "held_back": True,
                "loss": gate.get("loss"),
                "current_loss": gate.get("current_loss"),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "by": by,
                "reason": f"held back: loss {_fmt(gate.get('loss'))} vs {_fmt(gate.get('current_loss'))} of {current}",
            }
        )
        del rows[:-HISTORY_LIMIT]

    def describe(self, alias: str, placement: AdapterPlacement) -> dict[str, Any]:
        """The answer of `GET /admin/adapters/{alias}/history`.

        Raises:
            RouterError: `alias` never named an adapter (404).
        """
        if alias not in self.history and alias not in placement.aliases:
            raise RouterError(404, f"{alias!r} is not an alias of a published adapter; GET /admin/adapters lists them")
        return {"alias": alias, "current": placement.aliases.get(alias), "history": list(self.history.get(alias, []))}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def rollback(placement: AdapterPlacement, alias: str, to: str | int | None, by: str = "admin") -> dict[str, Any]:
    """Move `alias` back at once: to `to` (a published adapter name, or a version number it had), else to the
    adapter it named before the current one that is still published. Requests in flight finish on the version they
    started on (they resolved the alias when they arrived).

    Raises:
        RouterError: `alias` is no alias (404); no earlier version is still published, or `to` is not one (409/404).
    """
    current = placement.aliases.get(alias)
    if current is None:
        raise RouterError(404, f"{alias!r} is not an alias of a published adapter; GET /admin/adapters lists them")
    rows = placement.store.history.get(alias, [])
    if to is None:
        earlier = [
            r["name"]
            for r in reversed(rows)
            if r["name"] != current and r["name"] in placement.published and not r.get("held_back")
        ]
        if not earlier:
            raise RouterError(409, f"alias {alias!r} has no earlier version still published to roll back to")
        target = earlier[0]
    else:
        seen = {r["name"] for r in rows}
        named = [
            a.name
            for a in placement.published.values()
            if a.name == str(to) or (a.version is not None and str(a.version) == str(to) and a.name in seen)
        ]
        if not named:
            raise RouterError(
                404,
                f"no published version {to!r} of alias {alias!r}; `appliance adapters history {alias}` lists them",
                param="to",
            )
        target = named[0]
    placement.move_alias(alias, placement.published[target], by=by, reason=f"rollback from {current}")
    return {"alias": alias, "name": target, "from": current}
