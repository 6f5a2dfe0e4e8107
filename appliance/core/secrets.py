"""Tokens kept under `APPLIANCE_HOME/keys/`: generated once, file mode 0600, never logged."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from appliance.core.atomic import write_text_atomic


def ensure_token(keys_dir: Path, name: str, configured: SecretStr | None = None) -> str:
    """The configured token if set, else the one stored in `keys_dir/name`, else a new random one stored there."""
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    path = Path(keys_dir) / name
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(32)
    write_text_atomic(path, token + "\n")
    os.chmod(path, 0o600)
    return token


def hash_secret(value: str) -> str:
    """A salted-free SHA-256 hex digest, for API keys at rest (keys are long random strings, so no KDF is needed)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
