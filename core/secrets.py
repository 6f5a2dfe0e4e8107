"""Tokens kept under `APPLIANCE_HOME/keys/`: generated once, file mode 0600, never logged."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import Literal, overload

from pydantic import SecretStr

from fedllm.core.errors import ConfigError


def ensure_token(keys_dir: Path, name: str, configured: SecretStr | None = None) -> str:
    """The configured token if set, else the one stored in `keys_dir/name`, else a new random one stored there (0600).

    A blank configured value counts as unset. Two processes starting at once get the same new token.

    Raises:
        ConfigError: the stored file is empty or holds only whitespace (an empty token would accept an empty password).
    """
    if configured is not None and configured.get_secret_value().strip():
        return configured.get_secret_value().strip()
    path = Path(keys_dir) / name
    if not path.exists():
        _create_once(path, secrets.token_urlsafe(32) + "\n")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ConfigError(f"{path} is empty; delete it to have a new {name} generated, or write a token into it")
    return token


def _create_once(path: Path, text: str) -> None:
    """Create `path` (mode 0600) with `text` unless it exists: a hard link of a finished temp file, so a concurrent
    creator's file is never overwritten and no reader sees it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def read_secret_file(path: Path, what: str, hint: str = "") -> str:
    """The secret held in `path` (its text, stripped); `what` names it in errors, `hint` says where it comes from.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} from {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{path} is empty; it must hold the {what}{hint}")
    return value


@overload
def read_secret(path: Path | None, env_var: str, what: str, *, required: Literal[True]) -> str: ...


@overload
def read_secret(path: Path | None, env_var: str, what: str, *, required: bool) -> str | None: ...


def read_secret(path: Path | None, env_var: str, what: str, *, required: bool) -> str | None:
    """A secret from a file (see `read_secret_file`) or else the environment variable `env_var`; never from a
    command line.

    Raises:
        ConfigError: the file is missing or empty, or `required` and neither source has a value.
    """
    if path is not None:
        return read_secret_file(path, what)
    value = os.environ.get(env_var, "").strip() or None
    if required and value is None:
        raise ConfigError(f"the {what} is needed: pass a file holding it, or set {env_var}")
    return value


def masked(token: str, shown: int = 4) -> str:
    """The first `shown` characters of a secret and an ellipsis, for output that must not reveal it."""
    return f"{token[:shown]}…" if len(token) > 2 * shown else "…"


def hash_secret(value: str) -> str:
    """A salted-free SHA-256 hex digest, for API keys at rest (keys are long random strings, so no KDF is needed)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
