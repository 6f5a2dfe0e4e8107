"""API keys: created once by `appliance keys create`, stored only as SHA-256 hashes in `keys/api_keys.json`.

The file is `{"keys": [{"name", "hash", "rpm", "tpm", "created"}]}`, written atomically with mode 0600.
The plain key is shown once at creation and never stored or logged. A key's public id is the head of its hash
(`ApiKey.id`): `appliance keys list` shows it and `appliance keys revoke NAME|ID` takes either.

A running router re-reads the file when it changes (`KeyStore.refresh`, a `stat` at most once a second), so a
revoked key stops working within about a second, without a restart.

Keys fail closed. Once a key file has held a key, `keys/api_keys.required` marks the router as one that requires
keys (so does `serve.require_keys: true`, or a bind beyond loopback): an emptied or deleted key file then means that
no request is accepted, never that none needs a key, and an unreadable or corrupt one refuses every `/v1` request
(503) until it is fixed. Deleting the marker (and the keys) is how an operator goes back to a keyless loopback router.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm.core.atomic import write_text_atomic
from fedllm.core.errors import ConfigError, DataError
from fedllm.core.secrets import hash_secret

logger = logging.getLogger(__name__)

KEYS_FILE = "api_keys.json"
REQUIRED_MARKER = "api_keys.required"  # present once the router has had keys: they stay required
KEY_PREFIX = "sk-fedllm-"
KEY_ID_CHARS = 8  # hex digits of the hash shown as a key's id
RELOAD_CHECK_S = 1.0  # the router stats the key file at most this often


@dataclass(frozen=True)
class ApiKey:
    """One accepted key (its hash only) and its limits (None = unlimited)."""

    name: str
    hash: str
    rpm: int | None = None
    tpm: int | None = None
    created: int | None = None  # unix seconds

    @property
    def id(self) -> str:
        """The key's public id: the head of its hash (safe to show; reveals nothing of the key)."""
        return self.hash[:KEY_ID_CHARS]


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
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text)["keys"] if text.strip() else []
        return [ApiKey(r["name"], r["hash"], r.get("rpm"), r.get("tpm"), r.get("created")) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f'{path} is not a valid API key file ({exc}); expected {{"keys": [{{"name", "hash", ...}}]}}'
        ) from exc


def mark_required(keys_dir: Path) -> None:
    """Note that this router has had API keys, so that it keeps requiring them (fail closed)."""
    marker = Path(keys_dir) / REQUIRED_MARKER
    if not marker.exists():
        write_text_atomic(
            marker,
            "This router has had API keys: /v1 requests need one even if api_keys.json is emptied.\n"
            "Delete this file (and the keys) to run a keyless loopback router again.\n",
        )
        os.chmod(marker, 0o600)


def _save_keys(keys_dir: Path, keys: list[ApiKey]) -> None:
    rows = [{"name": k.name, "hash": k.hash, "rpm": k.rpm, "tpm": k.tpm, "created": k.created} for k in keys]
    path = keys_path(keys_dir)
    write_text_atomic(path, json.dumps({"keys": rows}, indent=2) + "\n")
    os.chmod(path, 0o600)
    if keys:
        mark_required(keys_dir)


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
    _save_keys(keys_dir, [*keys, ApiKey(name, hash_secret(plain), rpm, tpm, int(time.time()))])
    return plain


def revoke_key(keys_dir: Path, name_or_id: str) -> ApiKey:
    """Remove the key whose name or id is `name_or_id`; returns it. A running router drops it within a second.

    Raises:
        ConfigError: no key has this name or id, or the id is ambiguous.
    """
    keys = load_keys(keys_dir)
    matches = [k for k in keys if k.name == name_or_id] or [k for k in keys if name_or_id and k.id == name_or_id]
    if len(matches) != 1:
        known = ", ".join(f"{k.name} ({k.id})" for k in keys) or "none"
        problem = "matches several keys" if matches else "names no API key"
        raise ConfigError(f"{name_or_id!r} {problem}; known keys: {known} (see `appliance keys list`)")
    _save_keys(keys_dir, [k for k in keys if k is not matches[0]])
    return matches[0]


class KeyStore:
    """Accepted keys by hash: keys from settings plus the key file, re-read when the file changes.

    `public` (the router binds beyond loopback), `require` (serve.require_keys) or the marker of a router that has
    had keys make a key required whatever the file holds: an empty or deleted key file then means that no request is
    accepted, never that none needs a key. A file that cannot be read or parsed sets `broken` (its path, for the
    log): every request is refused until it is fixed.
    """

    def __init__(
        self,
        keys_dir: Path,
        plain_keys: list[str],
        default_rpm: int | None = None,
        default_tpm: int | None = None,
        *,
        public: bool = False,
        require: bool = False,
    ):
        self.keys_dir = Path(keys_dir)
        self.public = public
        self.require = require
        self.broken: Path | None = None  # the key file, while it cannot be read or parsed
        self._marked = False
        self._static = {
            hash_secret(k): ApiKey(f"settings-{i}", hash_secret(k), default_rpm, default_tpm)
            for i, k in enumerate(plain_keys)
        }
        self._defaults = (default_rpm, default_tpm)
        self._by_hash: dict[str, ApiKey] = dict(self._static)
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.refresh(force=True)

    @property
    def required(self) -> bool:
        """Whether /v1 requests must carry a key: on a public bind, with serve.require_keys, once the router has had
        keys (the marker), while the key file is broken, or when any key exists."""
        return self.public or self.require or self._marked or self.broken is not None or bool(self._by_hash)

    @property
    def empty(self) -> bool:
        """No key is accepted at all (a public router then refuses every /v1 request)."""
        return not self._by_hash

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the key file if it changed (checked at most once per `RELOAD_CHECK_S` unless `force`).

        A deleted file means no file keys. A file that cannot be read or parsed accepts no key and marks the store
        `broken` (fail closed: a key that was meant to be revoked must not survive a bad edit, and a router with keys
        must not open up), which is logged once per change with the file's path.
        """
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            st = os.stat(keys_path(self.keys_dir))
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError:  # the folder cannot be read: treat it as a change, and fail closed below
            stamp = (-1, -1, -1)
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp
        rpm, tpm = self._defaults
        self._marked = (self.keys_dir / REQUIRED_MARKER).exists()
        try:
            loaded = {
                k.hash: ApiKey(k.name, k.hash, k.rpm or rpm, k.tpm or tpm, k.created) for k in load_keys(self.keys_dir)
            }
            self.broken = None
        except (DataError, OSError) as exc:
            reason = (
                exc
                if isinstance(exc, DataError)
                else f"{keys_path(self.keys_dir)} cannot be read ({exc.strerror or exc})"
            )
            logger.error("%s; refusing every /v1 request until it is fixed", reason)
            loaded, self.broken = {}, keys_path(self.keys_dir)
        if loaded and not self._marked:
            try:
                mark_required(self.keys_dir)
                self._marked = True
            except OSError as exc:
                logger.warning(
                    "cannot write %s (%s); keys stay required while this router runs",
                    self.keys_dir / REQUIRED_MARKER,
                    exc,
                )
                self._marked = True
        self._by_hash = {**loaded, **self._static}

    def lookup(self, presented: str) -> ApiKey | None:
        """The key record for a presented plain key, or None."""
        return self._by_hash.get(hash_secret(presented))
