"""API keys: created once by `appliance keys create`, stored only as SHA-256 hashes in `keys/api_keys.json`.

The file is `{"keys": [{"name", "hash", "rpm", "tpm", "created"}]}`, written atomically with mode 0600.
The plain key is shown once at creation and never stored or logged.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.core.atomic import write_text_atomic
from appliance.core.errors import ConfigError, DataError
from appliance.core.secrets import hash_secret

KEYS_FILE = "api_keys.json"
KEY_PREFIX = "sk-fedllm-"


@dataclass(frozen=True)
class ApiKey:
    """One accepted key (its hash only) and its limits (None = unlimited)."""

    name: str
    hash: str
    rpm: int | None = None
    tpm: int | None = None


def keys_path(keys_dir: Path) -> Path:
    """Where the hashed API keys live."""
    return Path(keys_dir) / KEYS_FILE


def load_keys(keys_dir: Path) -> list[ApiKey]:
    """The keys stored under `keys_dir` (none if the file does not exist).

    Raises:
        DataError: the file exists but is not the expected JSON.
    """
    path = keys_path(keys_dir)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["keys"]
        return [ApiKey(r["name"], r["hash"], r.get("rpm"), r.get("tpm")) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a valid API key file ({exc}); expected {{\"keys\": [{{\"name\", \"hash\", ...}}]}}") from exc


def create_key(keys_dir: Path, name: str, *, rpm: int | None = None, tpm: int | None = None) -> str:
    """Create a key named `name`, store its hash with its limits, and return the plain key (shown once).

    Raises:
        ConfigError: a key with this name exists already, or a limit is not positive.
    """
    if not name or any(ch.isspace() for ch in name):
        raise ConfigError(f"invalid key name {name!r}: use a short name without spaces")
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise ConfigError(f"--{label} must be a positive whole number, got {value}")
    keys = load_keys(keys_dir)
    if any(k.name == name for k in keys):
        raise ConfigError(f"an API key named {name!r} exists already; choose another name")
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    rows = [{"name": k.name, "hash": k.hash, "rpm": k.rpm, "tpm": k.tpm} for k in keys]
    rows.append({"name": name, "hash": hash_secret(plain), "rpm": rpm, "tpm": tpm, "created": int(time.time())})
    path = keys_path(keys_dir)
    write_text_atomic(path, json.dumps({"keys": rows}, indent=2) + "\n")
    os.chmod(path, 0o600)
    return plain


class KeyStore:
    """Accepted keys by hash: keys from settings plus the key file, re-read when the file changes (checked ~1/s)."""

    def __init__(self, keys_dir: Path, plain_keys: list[str], default_rpm: int | None = None, default_tpm: int | None = None):
        self.keys_dir = Path(keys_dir)
        self._static = {hash_secret(k): ApiKey(f"settings-{i}", hash_secret(k), default_rpm, default_tpm) for i, k in enumerate(plain_keys)}
        self._defaults = (default_rpm, default_tpm)
        self._by_hash: dict[str, ApiKey] = dict(self._static)
        self._mtime: float | None = None
        self._checked = 0.0
        self.refresh(force=True)

    @property
    def required(self) -> bool:
        """True when any key is configured: then every /v1 request must carry one."""
        return bool(self._by_hash)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the key file if it changed (at most once a second unless `force`)."""
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        path = keys_path(self.keys_dir)
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime == self._mtime and not force:
            return
        self._mtime = mtime
        rpm, tpm = self._defaults
        loaded = {k.hash: ApiKey(k.name, k.hash, k.rpm or rpm, k.tpm or tpm) for k in load_keys(self.keys_dir)}
        self._by_hash = {**loaded, **self._static}

    def lookup(self, presented: str) -> ApiKey | None:
        """The key record for a presented plain key, or None."""
        self.refresh()
        return self._by_hash.get(hash_secret(presented))
