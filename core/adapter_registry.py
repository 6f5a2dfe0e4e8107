"""The adapter registry: versioned PEFT adapters under `APPLIANCE_HOME/adapters/NAME/VERSION/`.

Each version folder holds `adapter_config.json`, `adapter_model.safetensors` and `meta.json` (lineage: base
model, run or federation round, data hash, config, metrics). Versions are integers counting up from 1 and are
never rewritten; a new version is staged in a temp folder and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.atomic import write_json_atomic
from fedllm.core.errors import DataError, ModelNotFound

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_VERSION_ATTEMPTS = 100
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class AdapterVersion:
    """One registered adapter version."""

    name: str
    version: int
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """`NAME:VERSION`, the form every command accepts."""
        return f"{self.name}:{self.version}"

    @property
    def served_name(self) -> str:
        """The name this version answers to in vLLM and the router (`NAME-vVERSION`)."""
        return f"{self.name}-v{self.version}"


def check_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise DataError saying what is allowed."""
    if not _NAME_RE.match(name) or name.endswith(".tmp"):
        raise DataError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split `NAME[:VERSION]` into its parts (VERSION None = latest)."""
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise DataError(f"invalid adapter reference {ref!r}: the version after ':' must be a whole number")
    return check_name(name), int(version) if version else None


class AdapterRegistry:
    """Versioned adapters on disk. Safe for one writer per name; readers never see half a version."""

    def __init__(self, adapters_dir: Path):
        self.root = Path(adapters_dir)

    def register(self, name: str, source_dir: Path, meta: dict[str, Any] | None = None) -> AdapterVersion:
        """Copy a PEFT adapter folder in as the next version of `name`, with `meta` as its lineage.

        Raises:
            DataError: the name is invalid or the folder lacks the PEFT files.
        """
        check_name(name)
        missing = [f for f in ADAPTER_FILES if not (Path(source_dir) / f).exists()]
        if missing:
            raise DataError(f"{source_dir} is not a PEFT adapter folder: missing {', '.join(missing)}")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=self.root / name))
        try:
            for f in ADAPTER_FILES:
                shutil.copy2(Path(source_dir) / f, staging / f)
            for _ in range(_VERSION_ATTEMPTS):
                version = self._next_version(name)
                full_meta = {"name": name, "version": version, "created_at": time.time(), **(meta or {})}
                write_json_atomic(staging / "meta.json", full_meta)
                final = self.root / name / str(version)
                try:
                    os.rename(staging, final)  # fails while `final` holds a version: another writer took the number
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    continue
                return AdapterVersion(name, version, final, full_meta)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
        raise DataError(f"could not allocate a new version for adapter {name!r} after {_VERSION_ATTEMPTS} attempts")

    def _next_version(self, name: str) -> int:
        return max(self.versions(name), default=0) + 1

    def versions(self, name: str) -> list[int]:
        """Registered version numbers of `name`, ascending."""
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "meta.json").exists())

    def get(self, ref: str) -> AdapterVersion:
        """The version named by `NAME[:VERSION]` (latest if no version).

        Raises:
            ModelNotFound: no such adapter or version.
        """
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown adapter {name!r} (registered: {known})")
        version = versions[-1] if version is None else version
        if version not in versions:
            raise ModelNotFound(f"adapter {name!r} has no version {version} (versions: {versions})")
        path = self.root / name / str(version)
        return AdapterVersion(name, version, path, json.loads((path / "meta.json").read_text()))

    def names(self) -> list[str]:
        """Names with at least one version."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def list(self) -> list[AdapterVersion]:
        """Every version of every adapter, by name then version."""
        return [self.get(f"{n}:{v}") for n in self.names() for v in self.versions(n)]
